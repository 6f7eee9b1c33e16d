"""The held-out NLL study of a grid (epi_jax.report.nll_study): per-example quantities and NLL
bands against NumPy float64 references on random per-example files, the pairing by seed and
example, and the verdicts."""

import json

import numpy as np
import pytest

from epi_jax.report import FinishedRun, Run, RunError
from epi_jax.report import nll_study

STREAM = ["gsm8k", "code_alpaca", "logiqa"]
STAGES = [[t] for t in STREAM]
EXAMPLES = 7


def _tokens(seed: int, task: str) -> np.ndarray:
  """Response lengths of a seed's examples: the same for every method of the seed."""
  return np.random.default_rng([seed, len(task)]).integers(5, 60, EXAMPLES)


def _write_run(tmp_path, method: str, seed: int, stages, *, shift: float = 0.0, probes=("alpaca",)):
  """A run whose heldout_nll.json holds random per-example sums; ``shift`` is added to every
  per-token NLL after training (a method that ends worse everywhere)."""
  run_dir = tmp_path / f"{method}_s{seed}"
  run_dir.mkdir()
  rng = np.random.default_rng([seed, len(method), len(stages)])
  points = ["before"] + [f"after_stage_{k}" for k in range(len(stages))]
  sums = {}
  records = []
  for point in points:
    for task in STREAM + list(probes):
      n = _tokens(seed, task)
      per_token = rng.uniform(0.5, 2.5, EXAMPLES) + (shift if point != "before" else 0.0)
      if point == "before":  # the untrained model: the same for every method of a seed
        per_token = np.random.default_rng([seed, 99, len(task)]).uniform(0.5, 2.5, EXAMPLES)
      sums[point, task] = per_token * n
      records += [
          {"point": point, "task": task, "index": i, "nll_sum": float(s), "tokens": int(k)}
          for i, (s, k) in enumerate(zip(sums[point, task], n))
      ]
  (run_dir / nll_study.HELDOUT_NLL).write_text(
      json.dumps(
          {
              "tasks": STREAM,
              "probe_tasks": list(probes),
              "stages": stages,
              "points": points,
              "records": records[::-1],  # order does not matter: records carry their index
          }
      )
  )
  config = {"data": {"seed": seed}, "train": {"seed": seed}, "method": {"type": method}}
  run = FinishedRun(run_dir=str(run_dir), config=config, summary={"method": method}, records=[])
  return run, {k: v / _tokens(seed, k[1]) for k, v in sums.items()}


def test_run_is_still_the_finished_run():
  assert Run is FinishedRun


def test_per_example_quantities_equal_a_float64_reference(tmp_path):
  run, truth = _write_run(tmp_path, "multistage", 3, STAGES)
  scores = nll_study.read_heldout(run)
  values, tasks = nll_study.per_example(scores, "forgetting")
  assert tasks == ["gsm8k", "code_alpaca"]
  expected = np.concatenate(
      [
          truth["after_stage_2", "gsm8k"] - truth["after_stage_0", "gsm8k"],
          truth["after_stage_2", "code_alpaca"] - truth["after_stage_1", "code_alpaca"],
      ]
  )
  np.testing.assert_allclose(values, expected, rtol=1e-12)
  values, tasks = nll_study.per_example(scores, "probe")
  assert tasks == ["alpaca"]
  np.testing.assert_allclose(
      values, truth["after_stage_2", "alpaca"] - truth["before", "alpaca"], rtol=1e-12
  )
  values, tasks = nll_study.per_example(scores, "final")
  assert tasks == STREAM
  np.testing.assert_allclose(
      values, np.concatenate([truth["after_stage_2", t] for t in STREAM]), rtol=1e-12
  )


def test_a_single_stage_run_has_no_stream_forgetting(tmp_path):
  run, _ = _write_run(tmp_path, "full", 0, [STREAM])
  assert nll_study.per_example(nll_study.read_heldout(run), "forgetting") is None


def test_paired_rows_pair_seeds_and_examples(tmp_path):
  epi = [_write_run(tmp_path, "epi", s, STAGES) for s in range(3)]
  sft = [_write_run(tmp_path, "multistage", s, STAGES, shift=0.5) for s in range(3)]
  full = [_write_run(tmp_path, "full", s, [STREAM]) for s in range(2)]
  groups = {
      "epi": [r for r, _ in epi],
      "sequential": [r for r, _ in sft],
      "full": [r for r, _ in full],
  }
  rows = nll_study.paired_rows(groups, "epi")
  by_key = {(r["other"], r["quantity"]): r for r in rows}
  assert set(by_key) == {
      ("sequential", "forgetting"),
      ("sequential", "final"),
      ("sequential", "probe"),
      ("full", "final"),
      ("full", "probe"),
  }
  final = by_key["sequential", "final"]
  diff = np.stack(
      [
          np.concatenate([e[1]["after_stage_2", t] - q[1]["after_stage_2", t] for t in STREAM])
          for e, q in zip(epi, sft)
      ]
  )
  assert final["seeds"] == 3 and final["examples"] == 3 * EXAMPLES
  assert final["mean"] == pytest.approx(diff.mean(axis=1).mean(), rel=1e-12)
  assert final["low"] < final["mean"] < final["high"]
  assert final["high"] < 0 and final["verdict"] == "less"  # sequential ends 0.5 nats worse
  assert nll_study.reading(final) == "epi ends with a lower NLL"
  assert by_key["full", "probe"]["seeds"] == 2  # the seeds both groups have


def test_one_seed_gives_a_direction_not_a_verdict(tmp_path):
  groups = {
      "epi": [_write_run(tmp_path, "epi", 0, STAGES)[0]],
      "lora": [_write_run(tmp_path, "lora", 0, STAGES, shift=-0.5)[0]],
  }
  row = next(r for r in nll_study.paired_rows(groups, "epi") if r["quantity"] == "probe")
  assert row["low"] > 0
  assert nll_study.reading(row) == "direction only (1 seed): epi loses more general ability"


def test_runs_of_one_seed_with_different_examples_are_refused(tmp_path):
  a, _ = _write_run(tmp_path, "epi", 0, STAGES)
  b, _ = _write_run(tmp_path, "multistage", 0, STAGES)
  path = tmp_path / "multistage_s0" / nll_study.HELDOUT_NLL
  raw = json.loads(path.read_text())
  for record in raw["records"]:
    if record["task"] == "gsm8k" and record["index"] == 0:
      record["tokens"] += 1
  path.write_text(json.dumps(raw))
  with pytest.raises(RunError, match="cannot be paired"):
    nll_study.paired_rows({"epi": [a], "sequential": [b]}, "epi")


def test_bands_are_means_over_seeds_with_intervals_around_them(tmp_path):
  runs = [_write_run(tmp_path, "epi", s, STAGES) for s in range(2)]
  full = _write_run(tmp_path, "full", 0, [STREAM])
  bands = nll_study.nll_bands([r for r, _ in runs], stages=3)
  assert set(bands) == set(STREAM) | {"alpaca"}
  x, mean, low, high = np.array(bands["code_alpaca"]).T
  np.testing.assert_array_equal(x, [0, 1, 2, 3])
  expected = np.mean([t["after_stage_1", "code_alpaca"] for _, t in runs])
  assert mean[2] == pytest.approx(expected, rel=1e-12)
  assert np.all(low <= mean) and np.all(mean <= high) and np.all(low < high)
  x_full = [p[0] for p in nll_study.nll_bands([full[0]], stages=3)["gsm8k"]]
  assert x_full == [0.0, 3.0]  # a one-stage run's point sits at the end of the stream


def test_a_malformed_file_is_named(tmp_path):
  run, _ = _write_run(tmp_path, "epi", 0, STAGES)
  path = tmp_path / "epi_s0" / nll_study.HELDOUT_NLL
  raw = json.loads(path.read_text())
  raw["records"][0]["tokens"] += 1
  path.write_text(json.dumps(raw))
  with pytest.raises(RunError, match="examples differ between evaluation points"):
    nll_study.read_heldout(run)
  path.write_text('{"tasks": [')
  with pytest.raises(RunError, match="heldout_nll.json: unreadable"):
    nll_study.read_heldout(run)


def test_task_intervals_are_per_task_means_over_seeds_and_examples(tmp_path):
  runs = [_write_run(tmp_path, "multistage", s, STAGES) for s in range(3)]
  got = nll_study.task_intervals([r for r, _ in runs], "forgetting")
  assert list(got) == ["gsm8k", "code_alpaca"]
  want = np.mean([t["after_stage_2", "gsm8k"] - t["after_stage_0", "gsm8k"] for _, t in runs])
  mean, low, high = got["gsm8k"]
  assert mean == pytest.approx(want, rel=1e-12) and low < mean < high
  assert list(nll_study.task_intervals([r for r, _ in runs], "probe")) == ["alpaca"]
  full = _write_run(tmp_path, "full", 0, [STREAM])[0]
  assert nll_study.task_intervals([full], "forgetting") == {}
  # random grouping: a task in the last stage at one seed is forgotten at the others only
  shuffled = runs[:2] + [
      _write_run(tmp_path, "random", 2, [["logiqa"], ["code_alpaca"], ["gsm8k"]])
  ]
  got = nll_study.task_intervals([r for r, _ in shuffled], "forgetting")
  assert list(got) == ["gsm8k", "code_alpaca", "logiqa"]
  want = np.mean([t["after_stage_2", "gsm8k"] - t["after_stage_0", "gsm8k"] for _, t in runs[:2]])
  assert got["gsm8k"][0] == pytest.approx(want, rel=1e-12)
  _, table = shuffled[2]
  assert got["logiqa"][0] == pytest.approx(
      np.mean(table["after_stage_2", "logiqa"] - table["after_stage_0", "logiqa"]), rel=1e-12
  )
