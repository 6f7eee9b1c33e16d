"""The decoder-only transformer shared by the llama, mistral, qwen2 and gemma2 families."""

from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from epi_jax.models.config import ModelConfig
from epi_jax.models.layers import MLP, Attention, RMSNorm, dense, param


class KVCache(NamedTuple):
  """Keys and values of every layer at fixed slots; all rows write the same slot each step.

  Unscanned models keep a tuple of per-layer arrays, scanned ones one stacked array.
  """

  keys: tuple[jax.Array, ...] | jax.Array  # per layer (B, S, K, Dh), or stacked (L, B, S, K, Dh)
  values: tuple[jax.Array, ...] | jax.Array  # like keys
  mask: jax.Array  # (B, S) bool: the slot holds a real (non-padding) token
  index: jax.Array  # () int32: the next slot to write


def positions_from_mask(mask: jax.Array) -> jax.Array:
  """Token positions that skip left padding: cumsum(mask) - 1, 0 on padding (as transformers)."""
  return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=-1) - 1, 0)


def positions_from_segments(segment_ids: jax.Array) -> jax.Array:
  """Position of each token inside its packed example (restarting at 0), 0 on padding (id 0)."""
  t = jnp.arange(segment_ids.shape[-1])
  previous = jnp.pad(segment_ids[:, :-1], ((0, 0), (1, 0)), constant_values=-1)
  start = jax.lax.cummax(jnp.where(segment_ids != previous, t, 0), axis=1)
  return jnp.where(segment_ids > 0, t - start, 0)


def attention_mask(
    key_mask: jax.Array,
    first_slot: jax.Array | int,
    num_queries: int,
    window: int | None,
    segment_ids: jax.Array | None = None,
) -> jax.Array:
  """[B, T, S] bool: query slot first_slot + t sees key slot s <= it (and within ``window``).

  With ``segment_ids`` [B, T] (T = S, first_slot = 0) a query also sees only its own segment.
  """
  query_slot = first_slot + jnp.arange(num_queries)[:, None]
  key_slot = jnp.arange(key_mask.shape[-1])[None, :]
  allowed = key_slot <= query_slot
  if window is not None:
    allowed &= key_slot > query_slot - window
  allowed = allowed[None] & key_mask[:, None, :]
  if segment_ids is not None:
    allowed &= segment_ids[:, :, None] == segment_ids[:, None, :]
  return allowed


class Block(nnx.Module):
  """Pre-norm residual block; ``sandwich_norms`` adds Gemma-2's norms after attention and MLP."""

  def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
    def norm():
      return RMSNorm(
          config.hidden_size,
          eps=config.rms_norm_eps,
          unit_offset=config.norm_unit_offset,
          dtype=dtype,
          rngs=rngs,
      )

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


def _remat_policy(remat: str):
  return {
      "block": jax.checkpoint_policies.nothing_saveable,
      "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
  }[remat]


class Decoder(nnx.Module):
  """Token embedding, ``config.num_layers`` blocks in ``self.layers``, final norm, output head.

  ``self.layers`` is an ``nnx.List`` of blocks, or with ``config.scan_layers`` one block whose
  parameters carry a leading layer axis, run by ``lax.scan``. ``config.remat`` wraps each block
  in ``jax.checkpoint``. Parameters are stored in ``dtype``; the forward runs in
  ``config.compute_dtype`` (default: ``dtype``), with float32 norm statistics, softmax and logits.

  >>> model = Decoder(ModelConfig.tiny("gemma2"), rngs=nnx.Rngs(0))
  >>> model(jnp.ones((2, 5), jnp.int32)).shape
  (2, 5, 320)
  """

  def __init__(self, config: ModelConfig, *, dtype=jnp.float32, rngs: nnx.Rngs):
    self.config = config
    self.dtype = dtype
    self.compute_dtype = jnp.dtype(config.compute_dtype or dtype)
    self.embed = param(rngs, (config.vocab_size, config.hidden_size), ("vocab", "embed"), dtype)
    if config.scan_layers:

      @nnx.split_rngs(splits=config.num_layers)
      @nnx.vmap(in_axes=0, out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
      def stacked(rngs):
        return Block(config, dtype=dtype, rngs=rngs)

      self.layers = stacked(rngs)
    else:
      self.layers = nnx.List(
          [Block(config, dtype=dtype, rngs=rngs) for _ in range(config.num_layers)]
      )
    self.final_norm = RMSNorm(
        config.hidden_size,
        eps=config.rms_norm_eps,
        unit_offset=config.norm_unit_offset,
        dtype=dtype,
        rngs=rngs,
    )
    self.lm_head = (
        None
        if config.tie_word_embeddings
        else param(rngs, (config.hidden_size, config.vocab_size), ("embed", "vocab"), dtype)
    )

  def __call__(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      *,
      segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None,
  ) -> jax.Array:
    """Logits [B, T, V] (float32) of input_ids [B, T]: ``logits(hidden_states(...))``."""
    return self.logits(
        self.hidden_states(input_ids, attention_mask, segment_ids=segment_ids, positions=positions)
    )

  def hidden_states(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array | None = None,
      *,
      segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None,
  ) -> jax.Array:
    """The last block's output [B, T, D] for input_ids [B, T], before the final norm.

    Args:
      input_ids: [B, T] token ids.
      attention_mask: [B, T], 1 on real tokens; None: all real (ignored with segment_ids).
      segment_ids: [B, T] packed rows: example k of a row has id k (from 1), padding 0;
        attention never crosses a segment and positions restart in each.
      positions: [B, T] rotary positions; None: derived from the mask or the segments.
    """
    if segment_ids is not None:
      key_mask = segment_ids > 0
      if positions is None:
        positions = positions_from_segments(segment_ids)
    else:
      key_mask = (
          jnp.ones(input_ids.shape, bool) if attention_mask is None else attention_mask.astype(bool)
      )
      if positions is None:
        positions = positions_from_mask(key_mask)
    x = self._embed(input_ids)
    masks, which = self._masks(key_mask, 0, input_ids.shape[1], segment_ids)
    x, _ = self._blocks(x, positions, masks, which)
    return x

  def init_cache(self, batch: int, size: int) -> KVCache:
    """An empty cache of ``size`` slots per row."""
    cfg = self.config
    shape = (batch, size, cfg.num_kv_heads, cfg.head_dim)
    if cfg.scan_layers:
      zeros = jnp.zeros((cfg.num_layers, *shape), self.compute_dtype)
    else:
      zeros = tuple(jnp.zeros(shape, self.compute_dtype) for _ in range(cfg.num_layers))
    return KVCache(zeros, zeros, jnp.zeros((batch, size), bool), jnp.zeros((), jnp.int32))

  def decode(
      self,
      input_ids: jax.Array,
      attention_mask: jax.Array,
      positions: jax.Array,
      cache: KVCache,
      *,
      last_only: bool = False,
  ) -> tuple[jax.Array, KVCache]:
    """Appends input_ids [B, T] to ``cache`` at slots index..index+T-1; returns logits [B, T, V]
    (with ``last_only``, [B, 1, V]: a prompt's prefill needs no more) and the new cache."""
    key_mask = jax.lax.dynamic_update_slice_in_dim(
        cache.mask, attention_mask.astype(bool), cache.index, axis=1
    )
    x = self._embed(input_ids)
    masks, which = self._masks(key_mask, cache.index, input_ids.shape[1])
    x, (keys, values) = self._blocks(
        x, positions, masks, which, (cache.keys, cache.values), cache.index
    )
    new = KVCache(keys, values, key_mask, cache.index + input_ids.shape[1])
    return self.logits(x[:, -1:] if last_only else x), new

  def _blocks(self, x, positions, masks, which, kv=None, index=None):
    """Runs every block on x; returns x and the new caches (None without ``kv``)."""
    cfg = self.config

    def run(block, x, mask, layer_kv):
      return block(x, positions, mask, layer_kv, index)

    if not cfg.scan_layers:
      if cfg.remat != "none":
        run = nnx.remat(run, policy=_remat_policy(cfg.remat))
      keys, values = [], []
      for i, block in enumerate(self.layers):
        x, layer_kv = run(block, x, masks[which[i]], None if kv is None else (kv[0][i], kv[1][i]))
        if kv is not None:
          keys.append(layer_kv[0])
          values.append(layer_kv[1])
      return x, (None if kv is None else (tuple(keys), tuple(values)))

    # A plain lax.scan over the split state: unlike nnx.scan it also runs inside loops
    # (generation's while_loop) that trace the model at another level.
    graphdef, layer_state = nnx.split(self.layers)
    stacked_masks = jnp.stack(masks)  # (W, B, T, S): one per distinct window

    def body(x, xs):
      state, w, layer_kv = xs
      return run(nnx.merge(graphdef, state), x, stacked_masks[w], layer_kv)

    if cfg.remat != "none":
      body = jax.checkpoint(body, policy=_remat_policy(cfg.remat))
    return jax.lax.scan(body, x, (layer_state, jnp.asarray(which, jnp.int32), kv))

  def _masks(
      self, key_mask, first_slot, num_queries, segment_ids=None
  ) -> tuple[list[jax.Array], tuple[int, ...]]:
    """One [B, T, S] mask per distinct sliding window, and each layer's index into them."""
    windows = [self.config.window(i) for i in range(self.config.num_layers)]
    distinct = list(dict.fromkeys(windows))
    masks = [attention_mask(key_mask, first_slot, num_queries, w, segment_ids) for w in distinct]
    return masks, tuple(distinct.index(w) for w in windows)

  def _embed(self, input_ids: jax.Array) -> jax.Array:
    x = jnp.take(self.embed[...], input_ids, axis=0).astype(self.compute_dtype)  # (B, T, D)
    if self.config.scale_embeddings:
      x = x * jnp.asarray(math.sqrt(self.config.hidden_size), x.dtype)
    return x

  def logits(self, x: jax.Array) -> jax.Array:
    """Float32 logits [..., V] of hidden states x [..., D]: the final norm, then the head."""
    x = self.final_norm(x)
    head = self.embed[...].T if self.lm_head is None else self.lm_head[...]
    logits = dense(x, head, preferred_element_type=jnp.float32)
    cap = self.config.final_logit_softcap
    return logits if not cap else jnp.tanh(logits / cap) * cap
