"""The per-task metrics, keyed by the name each task's adapter declares, and the Avg. Norm. Score.

A task's metric is named once, beside its data: ``epi_jax.data.TASK_METRICS`` (the embedded
tasks) and ``epi_jax.data.DATASET_METRICS`` (the Hugging Face datasets). This module maps each
name to what it needs (greedy generations or option log-likelihoods) and how it scores them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence

import numpy as np

import epi_jax.data as data
from epi_jax.eval.code_bleu import code_scores, require_codebleu
from epi_jax.eval.gsm8k import gsm8k_scores
from epi_jax.eval.judge import Judge, judge_question
from epi_jax.eval.rouge import rouge_l


def _mean(values) -> float:
  values = list(values)
  return float(np.mean(values)) if values else 0.0


def exact_match(prediction: str, target: str) -> bool:
  """True if the generated response equals the target, ignoring surrounding whitespace."""
  return prediction.strip() == target.strip()


def _exact_match(examples, outputs, judge):
  del judge
  return {"exact_match": _mean(exact_match(o, e.reference) for e, o in zip(examples, outputs))}


def _gsm8k(examples, outputs, judge):
  del judge
  return gsm8k_scores(outputs, [e.reference for e in examples])


def _multiple_choice(examples, outputs, judge):
  """lm-evaluation-harness ``acc`` (argmax of the summed log-likelihoods) and ``acc_norm`` (argmax
  of log-likelihood / option length in characters), ``ConfigurableTask.process_results``."""
  del judge
  acc = [int(np.argmax(ll)) == e.answer for e, ll in zip(examples, outputs)]
  norm = [
      int(np.argmax(ll / np.array([float(len(c)) for c in e.choices]))) == e.answer
      for e, ll in zip(examples, outputs)
  ]
  return {"acc": _mean(acc), "acc_norm": _mean(norm)}


def _codebleu(examples, outputs, judge):
  del judge
  return code_scores(outputs, [e.reference for e in examples], lang="python")


def _judge(examples, outputs, judge: Judge | None):
  """ROUGE-L F1 against the reference always (``rougeL_proxy``); the judge's ratings too when
  one is configured. The two are never mixed: an unrated answer is left out of
  ``judge_score``, not replaced by its ROUGE-L."""
  out = {"rougeL_proxy": _mean(rouge_l(o, e.reference) for e, o in zip(examples, outputs))}
  if judge is not None:
    out |= judge.scores([judge_question(e.prompt) for e in examples], outputs)
  return out


@dataclasses.dataclass(frozen=True)
class Metric:
  """How a task's held-out examples are scored."""

  inputs: str
  """"generation": greedy continuations of the prompts; "loglikelihood": each option's
  summed log-likelihood after the prompt."""
  score: Callable[[Sequence[data.EvalExample], Sequence, Judge | None], dict]
  """(examples, outputs, judge or None) -> {metric name: value}."""
  headline: str
  """The key that goes into the accuracy matrix."""
  to_ten: float
  """Factor taking the headline to the paper's 0-10 scale (Section 3.1)."""
  proxy: str | None = None
  """The headline when the ``headline`` key is absent (no judge configured), scored 0-1."""
  requires: Callable[[], object] | None = None
  """Imports the metric's optional dependencies or raises ``epi_jax.extras.MissingExtra``
  (checked before a run trains)."""


METRICS: dict[str, Metric] = {
    "exact_match": Metric("generation", _exact_match, "exact_match", 10.0),
    "gsm8k": Metric("generation", _gsm8k, "exact_match_strict", 10.0),
    "multiple_choice": Metric("loglikelihood", _multiple_choice, "acc", 10.0),
    "codebleu": Metric("generation", _codebleu, "codebleu", 10.0, requires=require_codebleu),
    "judge": Metric("generation", _judge, "judge_score", 1.0, proxy="rougeL_proxy"),
}


def headline_key(metric: str, result: Mapping) -> str:
  """The name of the headline number of ``result``, scored by ``metric``."""
  m = METRICS[metric]
  return m.headline if m.proxy is None or m.headline in result else m.proxy


def headline_row(
    results: Mapping[str, Mapping], metrics: Mapping[str, str]
) -> dict[str, float | None]:
  """Task -> its headline number (None when it could not be measured, e.g. no judge reply)."""
  return {task: result[headline_key(metrics[task], result)] for task, result in results.items()}


def avg_norm_score(results: Mapping[str, Mapping], metrics: Mapping[str, str]) -> dict:
  """The paper's Avg. Norm. Score: the mean over tasks of each headline on a 0-10 scale.

  Section 3.1 of the paper normalizes "all task-specific metrics to a common 0-10 scale":
  a metric in [0, 1] (accuracy, exact match, CodeBLEU, ROUGE-L; the paper's percentages) is
  multiplied by 10, a 1-10 judge score is taken as it is.

  Returns:
    ``avg_norm_score`` (None if no task has a headline), ``normalized`` (task -> 0-10 value),
    ``proxy_tasks`` (tasks scored by ``rougeL_proxy`` instead of a judge: the average is then
    not the paper's), ``missing_tasks`` (no headline, left out of the mean).
  """
  normalized, proxy, missing = {}, [], []
  for task, result in results.items():
    key = headline_key(metrics[task], result)
    m = METRICS[metrics[task]]
    if result[key] is None:
      missing.append(task)
      continue
    normalized[task] = result[key] * (m.to_ten if key == m.headline else 10.0)
    if key != m.headline:
      proxy.append(task)
  value = sum(normalized.values()) / len(normalized) if normalized else None
  return {
      "avg_norm_score": value,
      "normalized": normalized,
      "proxy_tasks": proxy,
      "missing_tasks": missing,
  }
