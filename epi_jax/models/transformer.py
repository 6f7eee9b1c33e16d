"""The decoder-only transformer shared by the llama, mistral, qwen2 and gemma2 families."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from epi_jax.models.config import ModelConfig
from epi_jax.models.layers import MLP, Attention, RMSNorm, param


class KVCache(NamedTuple):
    """Keys and values of every layer at fixed slots; all rows write the same slot each step."""

    keys: tuple[jax.Array, ...]  # per layer (B, S, K, Dh)
    values: tuple[jax.Array, ...]  # per layer (B, S, K, Dh)
    mask: jax.Array  # (B, S) bool: the slot holds a real (non-padding) token
    index: jax.Array  # () int32: the next slot to write


def positions_from_mask(mask: jax.Array) -> jax.Array:
    """Token positions that skip left padding: cumsum(mask) - 1, 0 on padding (as transformers)."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def attention_mask(key_mask: jax.Array, first_slot: jax.Array | int, num_queries: int,
                   window: int | None) -> jax.Array:
    """[B, T, S] bool: query slot first_slot + t sees key slot s <= it (and within `window`)."""
    query_slot = first_slot + jnp.arange(num_queries)[:, None]
    key_slot = jnp.arange(key_mask.shape[-1])[None, :]
    allowed = key_slot <= query_slot
    if window is not None:
        allowed &= key_slot > query_slot - window
    return allowed[None] & key_mask[:, None, :]


class Block(nnx.Module):
    """Pre-norm residual block; `sandwich_norms` adds Gemma-2's norms after attention and MLP."""

    def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
        def norm():
            return RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                           unit_offset=config.norm_unit_offset, dtype=dtype, rngs=rngs)

        self.attn_norm = norm()
        self.attn = Attention(config, dtype=dtype, rngs=rngs)
        self.post_attn_norm = norm() if config.sandwich_norms else None
        self.mlp_norm = norm()
        self.mlp = MLP(config, dtype=dtype, rngs=rngs)
        self.post_mlp_norm = norm() if config.sandwich_norms else None

    def __call__(self, x, positions, mask, kv=None, index=None):
        h, kv = self.attn(self.attn_norm(x), positions, mask, kv, index)
        if self.post_attn_norm is not None:
            h = self.post_attn_norm(h)
        x = x + h
        h = self.mlp(self.mlp_norm(x))
        if self.post_mlp_norm is not None:
            h = self.post_mlp_norm(h)
        return x + h, kv


class Decoder(nnx.Module):
    """Token embedding, `config.num_layers` blocks in `self.layers`, final norm, output head.

    >>> model = Decoder(ModelConfig.tiny("gemma2"), rngs=nnx.Rngs(0))
    >>> model(jnp.ones((2, 5), jnp.int32)).shape
    (2, 5, 320)
    """

    def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.embed = param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), dtype)
        self.layers = nnx.List([Block(config, dtype=dtype, rngs=rngs)
                                for _ in range(config.num_layers)])
        self.final_norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps,
                                  unit_offset=config.norm_unit_offset, dtype=dtype, rngs=rngs)
        self.lm_head = None if config.tie_word_embeddings else param(
            rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), dtype)

    def __call__(self, input_ids: jax.Array, attention_mask: jax.Array | None = None) -> jax.Array:
        """Logits [B, T, V] (float32) of input_ids [B, T]; attention_mask [B, T] marks real tokens."""
        if attention_mask is None:
            attention_mask = jnp.ones(input_ids.shape, bool)
        attention_mask = attention_mask.astype(bool)
        positions = positions_from_mask(attention_mask)
        x = self._embed(input_ids)
        masks = self._masks(attention_mask, 0, input_ids.shape[1])
        for i, block in enumerate(self.layers):
            x, _ = block(x, positions, masks[self.config.window(i)])
        return self._logits(x)

    def init_cache(self, batch: int, size: int) -> KVCache:
        """An empty cache of `size` slots per row."""
        cfg = self.config
        shape = (batch, size, cfg.num_kv_heads, cfg.head_dim)
        zeros = tuple(jnp.zeros(shape, self.dtype) for _ in range(cfg.num_layers))
        return KVCache(zeros, zeros, jnp.zeros((batch, size), bool), jnp.zeros((), jnp.int32))

    def decode(self, input_ids: jax.Array, attention_mask: jax.Array, positions: jax.Array,
               cache: KVCache) -> tuple[jax.Array, KVCache]:
        """Appends input_ids [B, T] to `cache` at slots index..index+T-1; returns logits, new cache."""
        key_mask = jax.lax.dynamic_update_slice_in_dim(
            cache.mask, attention_mask.astype(bool), cache.index, axis=1)
        x = self._embed(input_ids)
        masks = self._masks(key_mask, cache.index, input_ids.shape[1])
        keys, values = [], []
        for i, block in enumerate(self.layers):
            x, (k, v) = block(x, positions, masks[self.config.window(i)],
                              (cache.keys[i], cache.values[i]), cache.index)
            keys.append(k)
            values.append(v)
        new = KVCache(tuple(keys), tuple(values), key_mask, cache.index + input_ids.shape[1])
        return self._logits(x), new

    def _masks(self, key_mask, first_slot, num_queries) -> dict[int | None, jax.Array]:
        windows = {self.config.window(i) for i in range(self.config.num_layers)}
        return {w: attention_mask(key_mask, first_slot, num_queries, w) for w in windows}

    def _embed(self, input_ids: jax.Array) -> jax.Array:
        x = jnp.take(self.embed[...], input_ids, axis=0)  # (B, T, D)
        if self.config.scale_embeddings:
            x = x * jnp.asarray(math.sqrt(self.config.hidden_size), x.dtype)
        return x

    def _logits(self, x: jax.Array) -> jax.Array:
        x = self.final_norm(x)
        if self.lm_head is None:
            logits = jnp.einsum("btd,vd->btv", x, self.embed[...],
                                preferred_element_type=jnp.float32)
        else:
            logits = jnp.einsum("btd,dv->btv", x, self.lm_head[...],
                                preferred_element_type=jnp.float32)
        cap = self.config.final_logit_softcap
        return logits if not cap else jnp.tanh(logits / cap) * cap
