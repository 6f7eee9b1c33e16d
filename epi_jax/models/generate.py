"""Batched autoregressive generation with a KV cache: greedy or temperature / top-p sampling."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from epi_jax.models.transformer import Decoder, positions_from_mask


def sample_token(
    logits: jax.Array, key: jax.Array, temperature: jax.Array, top_p: jax.Array
) -> jax.Array:
  """Draws from softmax(logits / temperature) restricted to the smallest top-p nucleus.

  Args:
    logits: [B, V] float.
    key: a PRNG key.
    temperature: () > 0.
    top_p: () in (0, 1]; the most likely token is always kept.

  Returns:
    [B] int32 token ids.
  """
  logits = logits.astype(jnp.float32) / temperature
  ordered = jnp.sort(logits, axis=-1)[:, ::-1]
  probs = jax.nn.softmax(ordered, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # mass of the strictly more likely tokens
  kept = jnp.where(before < top_p, ordered, jnp.inf)
  threshold = jnp.min(kept, axis=-1, keepdims=True)
  logits = jnp.where(logits >= threshold, logits, -jnp.inf)
  return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


def generate(
    model: Decoder,
    input_ids: jax.Array,
    attention_mask: jax.Array | None = None,
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_p: float = 1.0,
    eos_token_id: int | tuple[int, ...] | None = None,
    pad_token_id: int | None = None,
    rng: jax.Array | None = None,
) -> jax.Array:
  """Continues left-padded prompts; stops a row at EOS and the batch when all rows stopped.

  Args:
    model: the decoder.
    input_ids: [B, P] prompts, padded on the left.
    attention_mask: [B, P], 1 on real tokens, 0 on padding; None: all real.
    max_new_tokens: the length of the output.
    temperature: 0 for greedy decoding, else the sampling temperature.
    top_p: nucleus mass kept when sampling.
    eos_token_id: id(s) that end a row; None: the config's eos ids.
    pad_token_id: fills a row after its EOS; None: the config's pad id, else 0.
    rng: PRNG key for sampling (required when temperature > 0).

  Returns:
    [B, max_new_tokens] int32 new tokens, pad_token_id after each row's EOS.

  >>> model = Decoder(ModelConfig.tiny(), rngs=nnx.Rngs(0))
  >>> generate(model, jnp.array([[0, 5, 6], [4, 5, 6]]), jnp.array([[0, 1, 1], [1, 1, 1]]),
  ...          max_new_tokens=4).shape
  (2, 4)
  """
  if max_new_tokens < 1:
    raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
  if temperature < 0 or not 0 < top_p <= 1:
    raise ValueError(f"need temperature >= 0 and 0 < top_p <= 1, got {temperature}, {top_p}")
  greedy = temperature == 0
  if not greedy and rng is None:
    raise ValueError("sampling with temperature > 0 needs an rng key")
  cfg = model.config
  eos = (
      cfg.eos_ids
      if eos_token_id is None
      else ((eos_token_id,) if isinstance(eos_token_id, int) else tuple(eos_token_id))
  )
  pad = pad_token_id if pad_token_id is not None else cfg.pad_token_id or 0
  input_ids = jnp.asarray(input_ids, jnp.int32)
  mask = jnp.ones_like(input_ids) if attention_mask is None else jnp.asarray(attention_mask)
  graphdef, state = nnx.split(model)
  return _generate(
      graphdef,
      state,
      input_ids,
      mask.astype(bool),
      jax.random.key(0) if rng is None else rng,
      jnp.float32(temperature or 1.0),
      jnp.float32(top_p),
      max_new_tokens=max_new_tokens,
      greedy=greedy,
      eos=eos,
      pad=pad,
  )


@functools.partial(
    jax.jit, static_argnums=0, static_argnames=("max_new_tokens", "greedy", "eos", "pad")
)
def _generate(
    graphdef, state, input_ids, mask, rng, temperature, top_p, *, max_new_tokens, greedy, eos, pad
):
  model = nnx.merge(graphdef, state)
  batch, prompt_len = input_ids.shape

  def pick(logits, key):
    if greedy:
      return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return sample_token(logits, key, temperature, top_p)

  cache = model.init_cache(batch, prompt_len + max_new_tokens)
  logits, cache = model.decode(input_ids, mask, positions_from_mask(mask), cache, last_only=True)
  rng, key = jax.random.split(rng)
  first = pick(logits[:, -1], key)
  position = jnp.sum(mask, axis=-1, dtype=jnp.int32)  # (B,) position of the next token
  out = jnp.full((batch, max_new_tokens), pad, jnp.int32)
  done = jnp.zeros((batch,), bool)

  def keep_going(carry):
    step, _, done, *_ = carry
    return (step < max_new_tokens) & ~jnp.all(done)

  def step_fn(carry):
    step, token, done, out, cache, position, rng = carry
    token = jnp.where(done, pad, token)
    out = out.at[:, step].set(token)
    done = done | jnp.isin(token, jnp.asarray(eos, jnp.int32))
    logits, cache = model.decode(
        token[:, None], jnp.ones((batch, 1), bool), position[:, None], cache
    )
    rng, key = jax.random.split(rng)
    return step + 1, pick(logits[:, -1], key), done, out, cache, position + 1, rng

  carry = (jnp.int32(0), first, done, out, cache, position, rng)
  return jax.lax.while_loop(keep_going, step_fn, carry)[3]
