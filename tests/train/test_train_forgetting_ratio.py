"""Forgetting ratios, mask drift and stage planning."""

import pytest

from epi_jax.eval.forgetting import forgetting_ratios, format_table
from epi_jax.eval.mask_drift import overlap_at_progress
from epi_jax.train.loading import load_config
from epi_jax.train.methods import make_method


def test_forgetting_ratio_uses_accuracy_after_the_training_stage():
  matrix = [
      {"a": 0.5, "b": 0.0, "c": 0.0},
      {"a": 0.25, "b": 0.8, "c": 0.1},
      {"a": 0.2, "b": 0.4, "c": 0.9},
  ]
  ratios = forgetting_ratios(matrix, [["a"], ["b"], ["c"]])
  assert ratios["a"] == pytest.approx((0.5 - 0.2) / 0.5 * 100)
  assert ratios["b"] == pytest.approx((0.8 - 0.4) / 0.8 * 100)
  assert forgetting_ratios([{"a": 0.0}], [["a"]]) == {"a": None}
  assert ratios["c"] == 0.0
  assert "FR" in format_table(matrix, [["a"], ["b"], ["c"]], ratios)


@pytest.mark.parametrize(
    "overrides, stages",
    [
        (
            ["method.type=full"],
            [["arithmetic", "string_code", "logic_choice", "rewrite", "dialogue"]],
        ),
        (
            ["method.type=multistage"],
            [["arithmetic"], ["string_code"], ["logic_choice"], ["rewrite"], ["dialogue"]],
        ),
        (
            ["method.type=multistage", "method.grouping=heuristic"],
            [["arithmetic", "logic_choice"], ["string_code"], ["rewrite", "dialogue"]],
        ),
    ],
)
def test_plan_stages(tmp_path, overrides, stages):
  path = tmp_path / "c.yaml"
  path.write_text("")
  assert make_method(load_config(str(path), overrides)).stages() == stages


def test_random_grouping_uses_every_task_once(tmp_path):
  path = tmp_path / "c.yaml"
  path.write_text("")
  stages = make_method(
      load_config(str(path), ["method.grouping=random", "method.num_stages=2"])
  ).stages()
  assert len(stages) == 2 and sorted(sum(stages, [])) == sorted(
      ["arithmetic", "string_code", "logic_choice", "rewrite", "dialogue"]
  )


def test_mask_overlap_at_quarters_of_training():
  history = [{"step": s, "overlap_first": o} for s, o in [(30, 1.0), (60, 0.8), (90, 0.5)]]
  assert overlap_at_progress(history, 100) == {"50%": 1.0, "75%": 0.8, "100%": 0.5}
