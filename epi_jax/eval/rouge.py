"""ROUGE-L F1, the reference-based stand-in for the judge when none is configured.

References:
  Lin, "ROUGE: A Package for Automatic Evaluation of Summaries", ACL Workshop 2004.
  Google's ``rouge_score`` (``rouge_scorer.RougeScorer(["rougeL"])`` defaults): lower-case,
  every run of characters outside [a-z0-9] is a separator, no stemming; F1 of the
  longest-common-subsequence precision and recall, 0 when either side has no token.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_SEPARATOR = re.compile(r"[^a-z0-9]+")


def rouge_tokens(text: str) -> list[str]:
  """``rouge_score``'s default tokenization."""
  return [token for token in _SEPARATOR.split(text.lower()) if token]


def _lcs_length(a: Sequence[str], b: Sequence[str]) -> int:
  previous = [0] * (len(b) + 1)
  for x in a:
    current = [0]
    for j, y in enumerate(b):
      current.append(previous[j] + 1 if x == y else max(previous[j + 1], current[j]))
    previous = current
  return previous[-1]


def rouge_l(prediction: str, reference: str) -> float:
  """ROUGE-L F1 of ``prediction`` against ``reference``, in [0, 1]."""
  pred, ref = rouge_tokens(prediction), rouge_tokens(reference)
  if not pred or not ref:
    return 0.0
  lcs = _lcs_length(ref, pred)
  precision, recall = lcs / len(pred), lcs / len(ref)
  return 2 * precision * recall / (precision + recall) if lcs else 0.0
