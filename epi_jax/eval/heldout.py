"""Fixed batches for the analyses and the model's loss and gradients on them, under jit.

The loss is the trainer's (``epi_jax.models.loss``): mean cross-entropy over response tokens,
summed over micro-batches by a scan so memory stays that of one micro-batch.
"""

from __future__ import annotations

import functools
from collections.abc import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import epi_jax.data as data
from epi_jax.models.loss import mean_loss_and_grads, micro_batches, response_loss


def heldout_batch(
    encoder: data.ChatEncoder,
    chats: Mapping[str, Sequence[Sequence[data.Turn]]],
    tasks: Sequence[str],
    *,
    rows: int,
    seq_len: int,
) -> dict[str, np.ndarray]:
  """A fixed batch of the held-out chats of ``tasks``, one chat per row.

  Chats are taken in turn (the first of each task, then the second of each...), so every
  task is represented; each is cut to ``seq_len`` tokens; when there are fewer chats than
  ``rows``, the remaining rows are padding (no loss), so every batch has the same shape.
  """
  if not tasks:
    raise ValueError("heldout_batch needs at least one task")
  picked = [
      chats[t][i]
      for i in range(max(len(chats[t]) for t in tasks))
      for t in tasks
      if i < len(chats[t])
  ][:rows]
  examples = [
      data.Encoded(ids[:seq_len], mask[:seq_len])
      for ids, mask in (encoder.encode_chat(chat) for chat in picked)
  ]
  return data.make_batch(
      [[e] for e in examples] + [[]] * (rows - len(examples)),
      seq_len=seq_len,
      pad_id=encoder.pad_id,
  )


@functools.partial(nnx.jit, static_argnums=2)
def batch_gradients(model: nnx.Module, batch: dict[str, jax.Array], num_micro: int):
  """Gradients of the mean response-token loss of ``batch`` w.r.t. the model's ``nnx.Param``."""
  grads, _, _ = mean_loss_and_grads(model, batch, num_micro)
  return grads


def mean_loss(model: nnx.Module, batch: dict[str, jax.Array], num_micro: int) -> jax.Array:
  """The mean response-token loss of ``batch`` (not jitted: it is traced inside callers)."""

  def add(carry, micro):
    loss_sum, n = response_loss(model, micro)
    return (carry[0] + loss_sum, carry[1] + n), None

  (total, count), _ = jax.lax.scan(
      add, (jnp.float32(0), jnp.float32(0)), micro_batches(batch, num_micro)
  )
  return total / jnp.maximum(count, 1.0)
