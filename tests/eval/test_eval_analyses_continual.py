"""ACC, BWT, FWT, max-forgetting and mean FR against a NumPy float64 reference."""

import numpy as np
import pytest

from epi_jax.eval.continual import continual_summary, probe_forgetting


def reference(before, R, stage_of):
  """GEM / Chaudhry formulas on a [K, T] matrix, tasks assigned to stages by ``stage_of``."""
  R, b, s = np.asarray(R, np.float64), np.asarray(before, np.float64), np.asarray(stage_of)
  last = R.shape[0] - 1
  cols = np.arange(R.shape[1])
  old, new = s < last, s >= 1
  running_max = np.maximum.accumulate(
      np.where(np.arange(last + 1)[:, None] >= s, R, -np.inf), axis=0
  )
  return {
      "acc": R[last].mean(),
      "bwt": (R[last, old] - R[s[old], cols[old]]).mean(),
      "fwt": (R[s[new] - 1, cols[new]] - b[new]).mean(),
      "max_forgetting": (running_max[last - 1, old] - R[last, old]).mean(),
      "forgetting_ratio_mean": (
          ((R[s[old], cols[old]] - R[last, old]) / R[s[old], cols[old]] * 100).mean()
      ),
  }


def as_rows(R, tasks):
  return [dict(zip(tasks, map(float, row))) for row in R]


@pytest.mark.parametrize("seed", range(5))
def test_matches_the_reference_on_random_matrices_with_grouped_stages(seed):
  rng = np.random.default_rng(seed)
  stages = [["a"], ["b", "c"], ["d"], ["e", "f"]]
  tasks = [t for s in stages for t in s]
  stage_of = [k for k, s in enumerate(stages) for _ in s]
  R = rng.uniform(0.05, 1.0, (len(stages), len(tasks)))
  before = rng.uniform(0.0, 0.5, len(tasks))
  out = continual_summary(dict(zip(tasks, before)), as_rows(R, tasks), stages)
  for key, value in reference(before, R, stage_of).items():
    np.testing.assert_allclose(out[key], value, rtol=1e-12, err_msg=key)
  assert out["per_task"]["b"]["fwt"] == pytest.approx(R[0, 1] - before[1])
  assert out["per_task"]["e"]["bwt"] is None and out["per_task"]["a"]["fwt"] is None


def test_hand_computed_example():
  # a: 0.8 after its stage, then 0.9, then 0.5; b: 0.3 before training, 0.4 after stage 0.
  stages = [["a"], ["b"], ["c"]]
  matrix = [
      {"a": 0.8, "b": 0.4, "c": 0.1},
      {"a": 0.9, "b": 0.7, "c": 0.2},
      {"a": 0.5, "b": 0.6, "c": 0.9},
  ]
  out = continual_summary({"a": 0.1, "b": 0.3, "c": 0.0}, matrix, stages)
  assert out["acc"] == pytest.approx((0.5 + 0.6 + 0.9) / 3)
  assert out["bwt"] == pytest.approx(((0.5 - 0.8) + (0.6 - 0.7)) / 2)
  assert out["fwt"] == pytest.approx(((0.4 - 0.3) + (0.2 - 0.0)) / 2)
  assert out["max_forgetting"] == pytest.approx(((0.9 - 0.5) + (0.7 - 0.6)) / 2)
  assert out["forgetting_ratio_mean"] == pytest.approx((0.3 / 0.8 + 0.1 / 0.7) / 2 * 100)


def test_unmeasured_scores_one_stage_and_no_before_row():
  stages = [["a"], ["b"]]
  matrix = [{"a": None, "b": 0.2}, {"a": 0.4, "b": 0.6}]
  out = continual_summary(None, matrix, stages)
  assert out["fwt"] is None and out["bwt"] is None and out["max_forgetting"] is None
  assert out["acc"] == pytest.approx(0.5)
  single = continual_summary({"a": 0.1, "b": 0.1}, [{"a": 0.3, "b": 0.5}], [["a", "b"]])
  assert single["acc"] == pytest.approx(0.4)
  assert single["bwt"] is single["fwt"] is single["max_forgetting"] is None
  with pytest.raises(ValueError, match="at least one finished stage"):
    continual_summary(None, [], stages)


def test_probe_forgetting_by_hand():
  """Eq. 14 per probe with the score before training as Perf_initial, in float64."""
  rng = np.random.default_rng(7)
  tasks = ["p0", "p1", "p2", "p3"]
  before = dict(zip(tasks, rng.uniform(0.2, 1.0, 4)))
  after = dict(zip(tasks, rng.uniform(0.0, 1.0, 4)))
  before["p3"], after["p2"] = 0.0, None  # undefined: nothing to forget, or not measured
  out = probe_forgetting(before, after)
  want = {t: (before[t] - after[t]) / before[t] * 100 for t in ("p0", "p1")}
  assert out["forgetting_ratio"] == pytest.approx(want | {"p2": None, "p3": None})
  assert out["forgetting_ratio_mean"] == pytest.approx(np.mean(list(want.values())))
  assert out["before"] == before and out["after"] == after
  assert probe_forgetting(before, None)["forgetting_ratio_mean"] is None
