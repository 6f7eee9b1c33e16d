r"""GSM8K answer extraction and exact match, as lm-evaluation-harness's ``gsm8k`` task.

References:
  lm-evaluation-harness, ``lm_eval/tasks/gsm8k/gsm8k.yaml`` (version 3.0): filters
  "strict-match" (regex ``#### (\-?[0-9\.\,]+)``, first match) and "flexible-extract" (regex
  ``(-?[$0-9.,]{2,})|(-?[0-9]+)``, group_select -1: the last match), each followed by
  take_first; metric exact_match with ignore_case, regexes_to_ignore [",", "\$",
  "(?s).*#### ", "\.$"] applied to prediction and reference alike
  (``lm_eval/filters/extraction.py`` RegexFilter, ``lm_eval/api/metrics.py``
  exact_match_hf_evaluate).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

_PATTERNS = {
    "strict": (re.compile(r"#### (\-?[0-9\.\,]+)"), 0),
    "flexible": (re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)"), -1),
}
_IGNORED = (",", r"\$", r"(?s).*#### ", r"\.$")


def _normalize(text: str) -> str:
  """exact_match's preprocessing: the ignored regexes removed in order, then lower case."""
  for pattern in _IGNORED:
    text = re.sub(pattern, "", text)
  return text.lower()


def gsm8k_answer(text: str, mode: str = "strict") -> str | None:
  """The final answer of a generated GSM8K solution, normalized for exact match.

  Args:
    text: the generated solution.
    mode: "strict": the number after the first ``#### ``; "flexible": the last number-like run
      anywhere (digits with ``$``, ``,``, ``.``, of 2+ characters, or a lone digit run).

  Returns:
    The extracted answer with commas, ``$`` and a trailing period removed (lower-cased), or None
    when nothing matches (lm-evaluation-harness's "[invalid]", never equal to a reference).

  >>> gsm8k_answer("She pays 3 * $1,000 = $3,000.\\n#### 3,000")
  '3000'
  >>> gsm8k_answer("So the total is $1,250.", mode="flexible")
  '1250'
  """
  if mode not in _PATTERNS:
    raise ValueError(f"mode must be 'strict' or 'flexible', got {mode!r}")
  regex, select = _PATTERNS[mode]
  matches = regex.findall(text)
  if not matches:
    return None
  match = matches[select]
  if isinstance(match, tuple):
    match = next(group for group in match if group)
  return _normalize(match.strip())


def gsm8k_reference(answer: str) -> str:
  """The reference's final answer: its text after the last ``#### ``, normalized alike."""
  return _normalize(answer)


def gsm8k_scores(predictions: Sequence[str], references: Sequence[str]) -> dict[str, float]:
  """Exact-match accuracy of the strict and the flexible extraction against the references."""
  targets = [gsm8k_reference(r) for r in references]
  count = max(len(targets), 1)
  return {
      f"exact_match_{mode}": (
          sum(gsm8k_answer(p, mode) == t for p, t in zip(predictions, targets)) / count
      )
      for mode in _PATTERNS
  }
