"""The response-token loss of a batch: log-probabilities of target tokens from a decoder's hidden
states, with the logits made in chunks of tokens so that no [tokens, vocab] array exists whole,
and the loss's gradients summed over micro-batches by a scan."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax
from flax import nnx

# Logits of at most this many bytes at a time: over a 49k vocabulary, [B * T, V] float32 logits
# and their gradient would otherwise be a step's largest buffers (about 0.8 GB at 4 x 512).
LOGIT_CHUNK_BYTES = 128 * 2**20
# The arrays of a batch (``data.make_batch``) the loss reads, each [B, T].
BATCH_KEYS = ("input_ids", "loss_mask", "segment_ids", "positions")


def target_log_probs(model, hidden: jax.Array, targets: jax.Array) -> jax.Array:
  """log p(targets) [...] under ``model.logits(hidden)``, for hidden [..., D], targets [...]
  (``model``: anything with the Decoder's ``logits``).

  The logits are made and consumed in chunks of tokens (``LOGIT_CHUNK_BYTES``), each
  rematerialized in the backward pass; inputs whose logits fit one chunk take one plain pass.
  """
  shape = targets.shape
  x, t = hidden.reshape(-1, hidden.shape[-1]), targets.reshape(-1)

  def log_probs(x, t):
    return -optax.softmax_cross_entropy_with_integer_labels(model.logits(x), t)

  n = t.shape[0]
  vocab = model.logits(x[:1]).shape[-1]  # traced for its shape only: dead code to XLA
  chunk = max(1, LOGIT_CHUNK_BYTES // (4 * vocab))
  if n <= chunk:
    return log_probs(x, t).reshape(shape)
  pad = -n % chunk  # padded tokens are cut off again below
  x = jnp.pad(x, ((0, pad), (0, 0))).reshape(-1, chunk, x.shape[-1])
  t = jnp.pad(t, (0, pad)).reshape(-1, chunk)
  _, out = jax.lax.scan(jax.checkpoint(lambda c, xs: (c, log_probs(*xs))), None, (x, t))
  return out.reshape(-1)[:n].reshape(shape)


def response_loss(model: nnx.Module, batch: dict[str, jax.Array]) -> tuple[jax.Array, jax.Array]:
  """Summed cross-entropy over response tokens and their count; logits[:, t] predict
  input_ids[:, t + 1], weighted by loss_mask[:, t + 1]. Packed rows attend within their
  segments only (a padded row is one segment). The logits come in chunks
  (``target_log_probs``): the whole [B, T, V] array never exists."""
  hidden = model.hidden_states(
      batch["input_ids"], segment_ids=batch["segment_ids"], positions=batch["positions"]
  )
  log_probs = target_log_probs(model, hidden[:, :-1], batch["input_ids"][:, 1:])
  weight = batch["loss_mask"][:, 1:].astype(jnp.float32)
  return -jnp.sum(log_probs * weight), jnp.sum(weight)


def micro_batches(batch: dict[str, jax.Array], num_micro: int) -> dict[str, jax.Array]:
  """The batch [B, T] dealt into ``num_micro`` micro-batches [num_micro, B / num_micro, T]: row j
  goes to micro-batch j % num_micro, so each stays spread over the batch shards."""
  return {
      k: batch[k].reshape(-1, num_micro, *batch[k].shape[1:]).swapaxes(0, 1) for k in BATCH_KEYS
  }


def mean_loss_and_grads(
    model: nnx.Module,
    batch: dict[str, jax.Array],
    num_micro: int,
    *,
    wrt: nnx.filterlib.Filter = nnx.Param,
):
  """(gradients, mean loss, token count) of the response-token loss of ``batch`` w.r.t. the
  model's variables selected by ``wrt``, computed by a scan over ``num_micro`` micro-batches.

  The micro-batches' summed float32 gradients are divided by the batch's response-token count
  (at least 1), so they equal those of one pass over the batch; they stay float32 whatever the
  parameters' dtype (``make_optimizer`` keeps bfloat16 parameters' optimizer state in float32).
  """
  model_def, params, rest = nnx.split(model, wrt, ...)

  def summed(params, micro):
    return response_loss(nnx.merge(model_def, params, rest), micro)

  grad_fn = jax.value_and_grad(summed, has_aux=True)

  def accumulate(carry, micro):
    grads, total, count = carry
    (loss_sum, n), g = grad_fn(params, micro)
    grads = jax.tree.map(lambda a, b: a + b.astype(jnp.float32), grads, g)
    return (grads, total + loss_sum, count + n), None

  zeros = jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32), params)
  (grads, total, count), _ = jax.lax.scan(
      accumulate, (zeros, jnp.float32(0), jnp.float32(0)), micro_batches(batch, num_micro)
  )
  count = jnp.maximum(count, 1.0)
  return jax.tree.map(lambda g: g / count, grads), total / count, count
