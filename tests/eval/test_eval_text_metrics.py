"""ROUGE-L against rouge_score, CodeBLEU against the codebleu package, exact match, and the
normalized score."""

import numpy as np
import pytest
from codebleu import calc_codebleu
from rouge_score import rouge_scorer

from epi_jax.eval import avg_norm_score, code_scores, exact_match, headline_row, rouge_l
from epi_jax.eval.forgetting import forgetting_ratios, format_table
from epi_jax.eval.rouge import rouge_tokens

PAIRS = [
    ("The cat sat on the mat.", "A cat was sitting on the mat!"),
    ("Paris is the capital of France.", "The capital of France is Paris."),
    ("", "nothing generated"),
    ("Numbers 3, 14 and 15 count; so does x2.", "numbers: 3 14 15 X2"),
    ("Café déjà vu — naïve résumé", "cafe deja vu naive resume"),
    ("same same same", "same"),
    ("completely different words here", "nothing in common at all"),
]


def test_rouge_l_equals_rouge_score():
  scorer = rouge_scorer.RougeScorer(["rougeL"])
  for prediction, reference in PAIRS:
    expected = scorer.score(reference, prediction)["rougeL"].fmeasure
    assert rouge_l(prediction, reference) == pytest.approx(expected, abs=1e-12)
  rng = np.random.default_rng(0)
  words = ["a", "b", "c", "d", "e", "f"]
  for _ in range(50):
    prediction = " ".join(rng.choice(words, size=rng.integers(1, 15)))
    reference = " ".join(rng.choice(words, size=rng.integers(1, 15)))
    assert rouge_l(prediction, reference) == pytest.approx(
        scorer.score(reference, prediction)["rougeL"].fmeasure, abs=1e-12
    )
  assert rouge_tokens("It's 3:45 PM") == ["it", "s", "3", "45", "pm"]


REFERENCES = [
    "def add(a, b):\n    return a + b",
    "for i in range(10):\n    print(i)",
    "x = [n * n for n in nums if n % 2 == 0]",
    "class Stack:\n    def __init__(self):\n        self.items = []",
]
PREDICTIONS = [
    "def add(x, y):\n    return x + y",
    "for j in range(10):\n    print(j * 2)",
    "x = []\nfor n in nums:\n    x.append(n)",
    "print('hello')",
]


def test_codebleu_equals_the_package():
  direct = calc_codebleu(REFERENCES, PREDICTIONS, lang="python")
  ours = code_scores(PREDICTIONS, REFERENCES)
  assert ours["codebleu"] == direct["codebleu"]
  for name in ("ngram_match", "weighted_ngram_match", "syntax_match", "dataflow_match"):
    assert ours[name] == direct[f"{name}_score"]
  assert ours["bleu"] == ours["ngram_match"]
  assert 0 < ours["codebleu"] < 1
  assert code_scores([], []) == dict.fromkeys(
      ("codebleu", "ngram_match", "weighted_ngram_match", "syntax_match", "dataflow_match", "bleu")
  )
  with pytest.raises(ValueError, match="1 predictions for 2 references"):
    code_scores(["x"], ["x", "y"])


def test_avg_norm_score_rule():
  metrics = {
      "gsm8k": "gsm8k",
      "code_alpaca": "codebleu",
      "logiqa": "multiple_choice",
      "alpaca": "judge",
      "ultrachat": "judge",
      "arithmetic": "exact_match",
  }
  results = {
      "gsm8k": {"exact_match_strict": 0.556, "exact_match_flexible": 0.6},
      "code_alpaca": {"codebleu": 0.283},
      "logiqa": {"acc": 0.608, "acc_norm": 0.5},
      "alpaca": {"rougeL_proxy": 0.3, "judge_score": 7.8, "judge_rated": 3},
      "ultrachat": {"rougeL_proxy": 0.2, "judge_score": 8.1},
      "arithmetic": {"exact_match": 0.25},
  }
  out = avg_norm_score(results, metrics)
  expected = {
      "gsm8k": 5.56,
      "code_alpaca": 2.83,
      "logiqa": 6.08,
      "alpaca": 7.8,
      "ultrachat": 8.1,
      "arithmetic": 2.5,
  }
  assert out["normalized"] == pytest.approx(expected)
  assert out["avg_norm_score"] == pytest.approx(np.mean(list(expected.values())))
  assert out["proxy_tasks"] == [] and out["missing_tasks"] == []
  assert headline_row(results, metrics)["alpaca"] == 7.8

  # No judge: the ROUGE-L proxy stands in (x10), flagged; a judge that never answered: missing.
  results["alpaca"] = {"rougeL_proxy": 0.3}
  results["ultrachat"] = {"rougeL_proxy": 0.2, "judge_score": None, "judge_failed": 4}
  out = avg_norm_score(results, metrics)
  assert out["normalized"]["alpaca"] == pytest.approx(3.0) and "ultrachat" not in out["normalized"]
  assert out["proxy_tasks"] == ["alpaca"] and out["missing_tasks"] == ["ultrachat"]
  assert out["avg_norm_score"] == pytest.approx((5.56 + 2.83 + 6.08 + 3.0 + 2.5) / 5)
  assert headline_row(results, metrics)["alpaca"] == 0.3
  assert headline_row(results, metrics)["ultrachat"] is None


def test_a_missing_headline_leaves_the_forgetting_ratio_undefined():
  matrix = [{"alpaca": None, "gsm8k": 0.5}, {"alpaca": 6.0, "gsm8k": 0.25}]
  ratios = forgetting_ratios(matrix, [["alpaca"], ["gsm8k"]])
  assert ratios == {"alpaca": None, "gsm8k": 0.0}
  assert "n/a" in format_table(matrix, [["alpaca"], ["gsm8k"]], ratios).splitlines()[1]


def test_exact_match_ignores_surrounding_whitespace_only():
  assert exact_match(" 12+3=15 \n", "12+3=15")
  assert not exact_match("12+3=16", "12+3=15")
  assert not exact_match("12 +3=15", "12+3=15")
  assert not exact_match("", "A")
