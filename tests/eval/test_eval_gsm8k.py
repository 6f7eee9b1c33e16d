"""GSM8K answer extraction and scoring on hand-written generations (lm-evaluation-harness rules)."""

import pytest

from epi_jax.eval import gsm8k_answer, gsm8k_reference
from epi_jax.eval.gsm8k import gsm8k_scores

CASES = [
    # (generation, strict, flexible)
    (
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n48+24 = <<48+24=72>>72\n#### 72",
        "72",
        "72",
    ),
    ("The total is 1,250 + 750 = 2,000 dollars.\n#### 2,000", "2000", "2000"),
    ("He pays $3.50 per day.\n#### $3.50", None, "3.50"),  # strict needs a digit after ####
    ("Cost: 5 * $12 = $60.\n#### 60.", "60", "60"),  # trailing period dropped
    ("It drops by 15 degrees.\n#### -15", "-15", "-15"),
    ("The change is 4 - 9 = -5", None, "-5"),  # no ####: flexible only
    ("First 12, then 7, and the answer is 19.", None, "19"),  # flexible takes the last number
    ("So he has 3 apples left", None, "3"),  # a lone digit: second group
    ("#### 1,000,000\nThen more text 42", "1000000", "42"),  # strict first ####, flexible last
    ("#### 5\n#### 6", "5", "6"),  # strict: the first of several
    ("The answer is seven.", None, None),  # no number at all
    ("", None, None),
    ("Total: 0.5 kg.\n#### 0.5", "0.5", "0.5"),
    ("####72", None, "72"),  # strict needs "#### " with a space
    ("We get 18.00 dollars\n#### 18.00", "18.00", "18.00"),  # no numeric equality: 18.00 != 18
]


@pytest.mark.parametrize("text, strict, flexible", CASES)
def test_extraction(text, strict, flexible):
  assert gsm8k_answer(text, "strict") == strict
  assert gsm8k_answer(text, mode="flexible") == flexible


def test_reference_is_the_number_after_the_last_marker_and_modes_are_checked():
  assert gsm8k_reference("Janet sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\n#### 1,018") == "1018"
  assert gsm8k_reference("#### -3") == "-3"
  with pytest.raises(ValueError, match="mode must be 'strict' or 'flexible'"):
    gsm8k_answer("#### 1", mode="loose")


def test_scores_against_references():
  references = ["...\n#### 72", "...\n#### 2,000", "...\n#### 3.50", "...\n#### -5"]
  predictions = [CASES[0][0], CASES[1][0], CASES[2][0], CASES[5][0]]
  assert gsm8k_scores(predictions, references) == {
      "exact_match_strict": 0.5,
      "exact_match_flexible": 1.0,
  }
