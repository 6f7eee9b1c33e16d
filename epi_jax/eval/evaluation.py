"""Evaluation of every task by its own metric: one pass of batched generation, one of likelihoods."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import epi_jax.data as data
from epi_jax.eval.generation import generate_texts, option_loglikelihoods
from epi_jax.eval.judge import Judge
from epi_jax.eval.metrics import METRICS


def evaluate(
    model,
    encoder: data.ChatEncoder,
    examples: Mapping[str, Sequence[data.EvalExample]],
    metrics: Mapping[str, str],
    *,
    max_new_tokens: int,
    batch_size: int,
    judge: Judge | None = None,
) -> dict[str, dict]:
  """Scores every task's held-out examples with the metric ``metrics[task]`` names.

  The prompts of all generation-scored tasks are generated together (length buckets shared
  across tasks); each multiple-choice task's options are scored in [options x tokens] rows.

  Args:
    model: the decoder.
    encoder: the run's chat encoder.
    examples: task -> held-out examples.
    metrics: task -> a key of ``METRICS``.
    max_new_tokens: generation length.
    batch_size: rows per generation or likelihood call.
    judge: the LLM judge for "judge" tasks; None: they report only ``rougeL_proxy``.

  Returns:
    task -> {metric name: value, ..., "n": number of examples}.
  """
  unknown = {t: metrics.get(t) for t in examples if metrics.get(t) not in METRICS}
  if unknown:
    raise ValueError(
        f"tasks without a known metric: {unknown}; known metrics: {', '.join(METRICS)}"
    )
  generated = [t for t in examples if METRICS[metrics[t]].inputs == "generation"]
  prompts = [encoder.encode_prompt(e.prompt) for t in generated for e in examples[t]]
  texts = (
      generate_texts(model, encoder, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size)
      if prompts
      else []
  )
  outputs, start = {}, 0
  for t in generated:
    outputs[t], start = texts[start : start + len(examples[t])], start + len(examples[t])
  for t in examples:
    if t not in outputs:
      outputs[t] = option_loglikelihoods(model, encoder, examples[t], batch_size=batch_size)
  return {
      t: METRICS[metrics[t]].score(examples[t], outputs[t], judge) | {"n": len(examples[t])}
      for t in examples
  }
