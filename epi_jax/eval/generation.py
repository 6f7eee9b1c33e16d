"""Batched greedy generation and option log-likelihoods, with length buckets so few programs compile.

Prompts (and option rows) are sorted by length and padded to the next power of two (at least
``MIN_BUCKET``); a call holds ``batch_size`` rows, or for a bucket's last, partial batch the next
power of two above its count. Scoring rows longer than ``SCORING_LENGTH`` go fewer to a call
(``scoring_rows``), so that a long LogiQA context cannot multiply the attention scores'
memory. An evaluation compiles one program per (length, rows) shape it
meets, a handful, shared by all tasks and all stages (the held-out set does not change).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import epi_jax.data as data
from epi_jax.models.generate import generate
from epi_jax.models.loss import target_log_probs

MIN_BUCKET = 16
SCORING_LENGTH = 512


def bucket(length: int) -> int:
  """The padded length of a row of ``length`` tokens: the next power of two, >= MIN_BUCKET."""
  return max(MIN_BUCKET, 1 << max(length - 1, 0).bit_length())


def batch_rows(count: int, batch_size: int) -> int:
  """Rows of a call that scores ``count`` rows: the next power of two, at most ``batch_size``."""
  return min(batch_size, 1 << max(count - 1, 0).bit_length())


def scoring_rows(length: int, batch_size: int) -> int:
  """Rows of a scoring call at bucket ``length``: ``batch_size`` up to ``SCORING_LENGTH``
  tokens, then fewer, so that rows x length**2 (the attention scores) stays within
  ``batch_size`` x ``SCORING_LENGTH``**2; at least one."""
  if length <= SCORING_LENGTH:
    return batch_size
  return max(1, batch_size * SCORING_LENGTH**2 // length**2)


def _batches(lengths: Sequence[int], rows: Callable[[int], int]):
  """(bucket length, indices) of at most ``rows(bucket length)`` rows each, shortest first."""
  order = sorted(range(len(lengths)), key=lambda i: lengths[i])
  start = 0
  while start < len(order):
    size = bucket(lengths[order[start]])
    end = start
    while end < len(order) and end - start < rows(size) and bucket(lengths[order[end]]) == size:
      end += 1
    yield size, order[start:end]
    start = end


def _decode(encoder: data.ChatEncoder, ids: np.ndarray) -> str:
  """Text of ``ids`` up to the first EOS; "" when an id is outside the tokenizer's vocabulary
  (possible when the model's vocabulary is larger), which no metric scores as right."""
  stop = np.flatnonzero(ids == encoder.eos_id)
  ids = ids[: stop[0]] if stop.size else ids
  try:
    return encoder.decode([int(t) for t in ids if t != encoder.pad_id])
  except ValueError:
    return ""


def generate_texts(
    model,
    encoder: data.ChatEncoder,
    prompts: Sequence[np.ndarray],
    *,
    max_new_tokens: int,
    batch_size: int,
) -> list[str]:
  """Greedy continuations of ``prompts`` (token ids), decoded up to each row's EOS.

  Calls ``epi_jax.models.generate`` (KV cache; the batch stops when every row emitted EOS) on
  [rows, bucket] left-padded prompts, rows = ``batch_rows``; the spare rows of a partial batch
  repeat its first prompt, which ends no later than that prompt does.
  """
  out = [""] * len(prompts)
  for length, index in _batches([len(p) for p in prompts], lambda _: batch_size):
    rows = batch_rows(len(index), batch_size)
    ids = np.full((rows, length), encoder.pad_id, np.int32)
    mask = np.zeros((rows, length), np.int32)
    for r in range(rows):
      prompt = prompts[index[min(r, len(index) - 1)]]
      ids[r, length - len(prompt) :] = prompt
      mask[r, length - len(prompt) :] = 1
    new = np.asarray(
        generate(
            model,
            ids,
            mask,
            max_new_tokens=max_new_tokens,
            eos_token_id=encoder.eos_id,
            pad_token_id=encoder.pad_id,
        )
    )
    for r, i in enumerate(index):
      out[i] = _decode(encoder, new[r])
  return out


@functools.partial(jax.jit, static_argnums=0)
def _row_loglikelihoods(graphdef, state, ids, mask, scored):
  """Sum over t of log p(ids[:, t] | ids[:, :t]) where scored[:, t]; [R] float32."""
  model = nnx.merge(graphdef, state)
  token = target_log_probs(model, model.hidden_states(ids, mask)[:, :-1], ids[:, 1:])
  return jnp.sum(jnp.where(scored[:, 1:], token, 0.0), axis=-1)


def row_loglikelihoods(
    model, rows: Sequence[tuple[np.ndarray, np.ndarray]], *, pad_id: int, batch_size: int
) -> np.ndarray:
  """Per row (ids [T], scored [T] bool), sum over t >= 1 of log p(ids[t] | ids[:t]) where
  scored[t]; float64 [len(rows)] of float32 log-softmax values.

  Rows are right padded to their length bucket, ``batch_rows`` of them per call (at most
  ``scoring_rows``): one compiled program per (length, rows) shape, reused while the model's
  shapes stay.
  """
  graphdef, state = nnx.split(model)
  scores = np.zeros(len(rows))
  cap = lambda length: scoring_rows(length, batch_size)
  for length, index in _batches([len(ids) for ids, _ in rows], cap):
    batch = batch_rows(len(index), cap(length))
    ids = np.full((batch, length), pad_id, np.int32)
    mask = np.zeros((batch, length), np.int32)
    scored = np.zeros((batch, length), bool)
    for r, i in enumerate(index):
      row, keep = rows[i]
      ids[r, : len(row)], mask[r, : len(row)], scored[r, : len(row)] = row, 1, keep
    values = np.asarray(_row_loglikelihoods(graphdef, state, ids, mask, scored))
    scores[index] = values[: len(index)]
  return scores


def option_loglikelihoods(
    model, encoder: data.ChatEncoder, examples: Sequence[data.EvalExample], *, batch_size: int
) -> list[np.ndarray]:
  """Per example, the summed log-likelihood of each option's tokens after its prompt.

  As lm-evaluation-harness's multiple-choice ``loglikelihood`` requests under a chat template:
  the context is the prompt with the template's generation prompt, the continuation the option
  text with no delimiter (``target_delimiter`` is "" when a chat template is applied). One
  [options x tokens] row per option, right padded to its bucket; a row longer than the model's
  ``max_position_embeddings`` loses context tokens on the left (lm-evaluation-harness cuts alike).

  Returns:
    One float64 array [len(example.choices)] per example.
  """
  limit = model.config.max_position_embeddings
  rows, owner = [], []
  for e, example in enumerate(examples):
    if not example.choices:
      raise ValueError(f"example {e} has no choices to score")
    for option in example.choices:
      prompt, completion = encoder.encode_completion(example.prompt, option)
      row = np.concatenate([prompt, completion])[-limit:]
      scored = np.zeros(len(row), bool)
      scored[max(len(row) - len(completion), 1) :] = True
      rows.append((row, scored))
      owner.append(e)
  scores = row_loglikelihoods(model, rows, pad_id=encoder.pad_id, batch_size=batch_size)
  out = [[] for _ in examples]
  for e, value in zip(owner, scores):
    out[e].append(value)
  return [np.asarray(v, np.float64) for v in out]
