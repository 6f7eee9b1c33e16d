"""Decoder building blocks: RMSNorm, rotary embeddings, grouped-query attention, gated MLP.

Shapes: B batch, T new tokens, S attended key slots, D hidden, H query heads, K kv heads,
G = H // K query heads per kv head, Dh head dim, F MLP width.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from epi_jax.models.config import ModelConfig

_NEG = float(np.finfo(np.float32).min)
# Self-attention over at least two blocks of this many queries skips the key blocks that
# causality hides from each query block (about 3/8 of the score work at T = 4 blocks).
CAUSAL_BLOCK = 128


def param(
    rngs: nnx.Rngs,
    shape: tuple[int, ...],
    names: tuple[str, ...],
    dtype,
    init=nnx.initializers.normal(0.02),
) -> nnx.Param:
  """A parameter tagged with logical axis names (resolved to a mesh by sharding.RULES)."""
  return nnx.Param(init(rngs.params(), shape, dtype), out_sharding=names, eager_sharding=False)


def dense(x: jax.Array, kernel: jax.Array, **kwargs) -> jax.Array:
  """x [..., D] @ kernel [D, N] as one 2-D matmul over all leading axes (XLA's CPU backend
  runs [B, T, D] @ [D, N] about 25% slower than the same product on [B * T, D]). The kernel is
  cast to x's dtype, the compute dtype (a no-op when the parameters are stored in it)."""
  y = jnp.matmul(x.reshape(-1, x.shape[-1]), kernel.astype(x.dtype), **kwargs)
  return y.reshape(*x.shape[:-1], kernel.shape[-1])


class RMSNorm(nnx.Module):
  """x / rms(x) * w, or * (1 + w) when ``unit_offset`` (Gemma); normalized in float32."""

  def __init__(self, dim: int, *, eps: float, unit_offset: bool, dtype, rngs: nnx.Rngs):
    init = nnx.initializers.zeros if unit_offset else nnx.initializers.ones
    self.scale = param(rngs, (dim,), ("norm",), dtype, init)
    self.eps = eps
    self.unit_offset = unit_offset

  def __call__(self, x: jax.Array) -> jax.Array:
    x32 = x.astype(jnp.float32)
    normed = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    if self.unit_offset:
      return (normed * (1.0 + self.scale[...].astype(jnp.float32))).astype(x.dtype)
    return self.scale[...].astype(x.dtype) * normed.astype(x.dtype)


def rope_frequencies(config: ModelConfig) -> np.ndarray:
  """Inverse rotary frequencies [Dh / 2], with the ``llama3`` scaling when configured."""
  dim = config.head_dim
  inv_freq = 1.0 / config.rope_theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
  scaling = config.rope_scaling
  if scaling is None:
    return inv_freq.astype(np.float32)
  old_len = scaling.original_max_position_embeddings
  wavelen = 2 * math.pi / inv_freq
  smooth = (old_len / wavelen - scaling.low_freq_factor) / (
      scaling.high_freq_factor - scaling.low_freq_factor
  )
  scaled = np.where(
      wavelen > old_len / scaling.low_freq_factor, inv_freq / scaling.factor, inv_freq
  )
  medium = (wavelen >= old_len / scaling.high_freq_factor) & (
      wavelen <= old_len / scaling.low_freq_factor
  )
  blended = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  return np.where(medium, blended, scaled).astype(np.float32)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: np.ndarray) -> jax.Array:
  """Rotates the two halves of each head of x [B, T, N, Dh] by angle position * frequency."""
  angles = positions[..., None].astype(jnp.float32) * inv_freq  # (B, T, Dh/2)
  cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
  sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


class Attention(nnx.Module):
  """Grouped-query attention with rotary embeddings, optional qkv biases and logit soft-capping."""

  def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
    d, h, k, dh = config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim
    self.q = param(rngs, (d, h, dh), ("embed", "q_heads", "head_dim"), dtype)
    self.k = param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), dtype)
    self.v = param(rngs, (d, k, dh), ("embed", "kv_heads", "head_dim"), dtype)
    self.o = param(rngs, (h, dh, d), ("q_heads", "head_dim", "embed"), dtype)
    if config.attention_bias:
      zeros = nnx.initializers.zeros
      self.q_bias = param(rngs, (h, dh), ("q_heads", "head_dim"), dtype, zeros)
      self.k_bias = param(rngs, (k, dh), ("kv_heads", "head_dim"), dtype, zeros)
      self.v_bias = param(rngs, (k, dh), ("kv_heads", "head_dim"), dtype, zeros)
    else:
      self.q_bias = self.k_bias = self.v_bias = None
    self.config = config

  def _project(self, x: jax.Array, kernel: nnx.Param, bias: nnx.Param | None) -> jax.Array:
    d, n, dh = kernel.shape
    y = dense(x, kernel[...].reshape(d, n * dh)).reshape(*x.shape[:-1], n, dh)
    return y if bias is None else y + bias[...].astype(y.dtype)

  def __call__(
      self,
      x: jax.Array,
      positions: jax.Array,
      mask: jax.Array,
      kv: tuple[jax.Array, jax.Array] | None = None,
      index: jax.Array | None = None,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    """Attends x [B, T, D] to itself, or to the cache ``kv`` after writing x's keys at ``index``.

    ``mask`` [B, T, S] is True where a query may see a key slot. Returns ([B, T, D], new kv).
    """
    cfg = self.config
    inv_freq = rope_frequencies(cfg)
    q = apply_rope(self._project(x, self.q, self.q_bias), positions, inv_freq)  # (B, T, H, Dh)
    k = apply_rope(self._project(x, self.k, self.k_bias), positions, inv_freq)  # (B, T, K, Dh)
    v = self._project(x, self.v, self.v_bias)
    if kv is not None:
      k = jax.lax.dynamic_update_slice_in_dim(kv[0], k.astype(kv[0].dtype), index, axis=1)
      v = jax.lax.dynamic_update_slice_in_dim(kv[1], v.astype(kv[1].dtype), index, axis=1)
      kv = (k, v)
    b, t, _, dh = q.shape
    # Heads-major layouts: XLA's CPU batched matmuls run about twice as fast on them.
    q = q.reshape(b, t, cfg.num_kv_heads, cfg.num_heads // cfg.num_kv_heads, dh)
    q = q.transpose(0, 2, 3, 1, 4)  # (B, K, G, T, Dh)
    k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # (B, K, S, Dh)
    if kv is None and t % CAUSAL_BLOCK == 0 and t >= 2 * CAUSAL_BLOCK:
      # Without a cache, query i only sees keys j <= i: block n needs keys [0, end).
      ends = range(CAUSAL_BLOCK, t + 1, CAUSAL_BLOCK)
      out = jnp.concatenate(
          [
              self._attend(
                  q[:, :, :, end - CAUSAL_BLOCK : end],
                  k[:, :, :end],
                  v[:, :, :end],
                  mask[:, end - CAUSAL_BLOCK : end, :end],
              )
              for end in ends
          ],
          axis=3,
      )
    else:
      out = self._attend(q, k, v, mask)
    out = out.transpose(0, 3, 1, 2, 4).reshape(b, t, cfg.num_heads * dh)
    return dense(out, self.o[...].reshape(cfg.num_heads * dh, -1)), kv

  def _attend(self, q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array) -> jax.Array:
    """Softmax attention of q [B, K, G, T, Dh] over k, v [B, K, S, Dh] where mask [B, T, S]."""
    cfg = self.config
    logits = (
        jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=jnp.float32) * cfg.attn_scale
    )
    if cfg.attn_logit_softcap:
      logits = jnp.tanh(logits / cfg.attn_logit_softcap) * cfg.attn_logit_softcap
    logits = jnp.where(mask[:, None, None], logits, _NEG)
    probs = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    return jnp.einsum("bkgts,bksh->bkgth", probs, v)


class MLP(nnx.Module):
  """Gated MLP: down(act(x @ gate) * (x @ up)); SwiGLU with silu, GeGLU with tanh-gelu."""

  def __init__(self, config: ModelConfig, *, dtype, rngs: nnx.Rngs):
    d, f = config.hidden_size, config.intermediate_size
    self.gate = param(rngs, (d, f), ("embed", "mlp"), dtype)
    self.up = param(rngs, (d, f), ("embed", "mlp"), dtype)
    self.down = param(rngs, (f, d), ("mlp", "embed"), dtype)
    self.activation = config.activation

  def __call__(self, x: jax.Array) -> jax.Array:
    gate = dense(x, self.gate[...])
    if self.activation == "gelu_tanh":
      gate = jax.nn.gelu(gate, approximate=True)
    else:
      gate = jax.nn.silu(gate)
    return dense(gate * dense(x, self.up[...]), self.down[...])
