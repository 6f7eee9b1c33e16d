"""eval.analyses through the trainer: validation, every metric in summary.json and
metrics.jsonl, and a resumed run that ends with the same analyses."""

import json
import pathlib
import shutil
import sys

import pytest

from epi_jax.eval.analyses import ANALYSES
from epi_jax.train.config import EvalSection
from epi_jax.train.loading import ConfigError, load_config
from epi_jax.train.loop import train

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1] / "train"))
from tiny_run import tiny_config_file  # noqa: E402

ALL = "eval.analyses=[" + ", ".join(ANALYSES) + "]"


def test_the_config_lists_exactly_the_analyses_the_loop_runs():
  import typing

  hint = typing.get_type_hints(EvalSection)["analyses"]
  assert typing.get_args(typing.get_args(hint)[0]) == ANALYSES


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["eval.analyses=[tgc]"], "eval.analyses[0]: must be one of"),
        (["eval.analyses=[flip_rate, flip_rate]"], "lists flip_rate more than once"),
        (
            ["method.type=multistage", "eval.analyses=[perturbation, flip_rate]"],
            "method.type=multistage cannot serve perturbation, flip_rate",
        ),
        (["data.tasks=[rewrite]", "eval.analyses=[gradient_conflict]"], "at least 2, got 1"),
        (["method.p=0.0", "eval.analyses=[task_overlap]"], "method.p must be > 0"),
    ],
)
def test_bad_analyses_are_refused_by_name(tmp_path, overrides, message):
  with pytest.raises(ConfigError, match=r"eval\.analyses") as error:
    load_config(tiny_config_file(tmp_path), overrides)
  assert message in str(error.value)


def without_times(tree):
  if isinstance(tree, dict):
    return {k: without_times(v) for k, v in tree.items() if not k.endswith("time_s")}
  if isinstance(tree, list):
    return [without_times(v) for v in tree]
  return tree


@pytest.mark.slow
def test_every_analysis_lands_in_the_summary_and_survives_a_resume(tmp_path):
  config = load_config(tiny_config_file(tmp_path), [ALL, "eval.probe_tasks=[arithmetic]"])
  full = train(config, run_dir=str(tmp_path / "full"))
  saved = json.loads((tmp_path / "full" / "summary.json").read_text())
  analyses = saved["analyses"]
  assert set(analyses) == set(ANALYSES)
  continual = analyses["continual"]
  for key in ("acc", "bwt", "fwt", "max_forgetting", "forgetting_ratio_mean", "per_task"):
    assert key in continual
  assert set(continual["before"]) == {"logic_choice", "rewrite"}
  assert continual["acc"] is not None and continual["fwt"] is not None
  for name in ("gradient_conflict", "task_overlap"):
    assert [r["after_stage"] for r in analyses[name]["per_stage"]] == [0, 1]
    final = analyses[name]["final"]
    assert set(final["pairs"]) == {"logic_choice/rewrite"} and final["average"] is not None
  assert 0 <= analyses["task_overlap"]["final"]["average"] <= 1
  flips = analyses["flip_rate"]
  assert flips["refreshes"] == 2 and 0 < flips["all"] <= 1
  assert len(flips["per_group"]) == len(saved["mask_history"][0]["protected"])
  assert "block/0" in flips["per_group"]
  points = analyses["perturbation"]
  assert [points[p]["step"] for p in ("early", "middle", "late")] == [2, 3, 6]
  assert all(-1 <= points[p]["spearman"] <= 1 and points[p]["n"] > 0 for p in points)
  assert points["late"]["old_tasks"] == ["logic_choice"]
  nll = analyses["nll"]
  assert [r["point"] for r in nll["matrix"]] == ["before", "after_stage_0", "after_stage_1"]
  assert all(set(r["nll"]) == {"logic_choice", "rewrite", "arithmetic"} for r in nll["matrix"])
  assert nll["forgetting"]["rewrite"] is None and nll["bwt"] == nll["forgetting"]["logic_choice"]
  assert set(nll["probe"]) == {"arithmetic"} and nll["probe"]["arithmetic"]["change"] is not None
  per_example = json.loads((tmp_path / "full" / "heldout_nll.json").read_text())
  # before: every task; after stage 0: its task; after stage 1: both and the probe
  assert len(per_example["records"]) == (3 + 1 + 3) * 4

  with open(tmp_path / "full" / "metrics.jsonl") as f:
    kinds = {json.loads(line)["kind"] for line in f}
  assert {
      "eval_before",
      "gradient_conflict",
      "task_overlap",
      "flip_rate",
      "perturbation",
      "continual",
      "nll_before",
      "nll",
      "nll_forgetting",
  } <= kinds

  shutil.copytree(tmp_path / "full", tmp_path / "cut")
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "6")
  (tmp_path / "cut" / "summary.json").unlink()
  resumed = train(config, run_dir=str(tmp_path / "cut"), resume=True)
  assert resumed["params_sha256"] == full["params_sha256"]
  assert without_times(resumed["analyses"]) == without_times(full["analyses"])
  assert (tmp_path / "cut" / "heldout_nll.json").read_text() == json.dumps(per_example, indent=1)


def test_probe_tasks_are_scored_by_their_metric_before_and_after_the_stream(tmp_path):
  """continual scores each probe task with its own metric on the untrained model and on the
  model after the last stage: the same numbers as an evaluation of those two models."""
  from epi_jax.eval.evaluation import evaluate
  from epi_jax.eval.metrics import headline_row
  from epi_jax.models import from_pretrained
  from epi_jax.train.model import build_model
  from epi_jax.train.tasks import load_tasks

  config = load_config(
      tiny_config_file(tmp_path),
      ["method.type=multistage", "eval.analyses=[continual]", "eval.probe_tasks=[arithmetic]"],
  )
  train(config, run_dir=str(tmp_path / "run"))
  probes = json.loads((tmp_path / "run" / "summary.json").read_text())["analyses"]["continual"][
      "probes"
  ]
  examples = load_tasks(config).probes
  metrics = {"arithmetic": "exact_match"}

  def score(model):
    e = config.eval
    results = evaluate(
        model,
        load_tasks(config).encoder,
        examples,
        metrics,
        max_new_tokens=e.max_new_tokens,
        batch_size=e.batch_size,
    )
    return headline_row(results, metrics)

  assert probes["before"] == score(build_model(config.model, seed=config.train.seed))
  assert probes["after"] == score(from_pretrained(str(tmp_path / "run" / "model"))[0])
  records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").open()]
  assert [r["step"] for r in records if r["kind"] == "eval_probes"] == [0, 6]


def test_runs_of_two_methods_share_the_before_training_scores(tmp_path):
  """continual's scores of the untrained model (the stream tasks' and the probes') come from
  eval.nll_cache in a run of another method of the seed; other generation settings miss."""
  cache = ["eval.analyses=[continual]", "eval.probe_tasks=[arithmetic]"]
  cache.append(f"eval.nll_cache={tmp_path / 'cache'}")

  def continual(name, *sets):
    config = load_config(tiny_config_file(tmp_path), [*cache, *sets])
    return train(config, run_dir=str(tmp_path / name))["analyses"]["continual"]

  first = continual("a", "method.type=multistage")
  second = continual("b", "method.type=epi")
  third = continual("c", "method.type=epi", "eval.max_new_tokens=3")
  assert [r["before_cache"]["hit"] for r in (first, second, third)] == [False, True, False]
  assert first["before_cache"]["file"] == second["before_cache"]["file"]
  assert third["before_cache"]["file"] != first["before_cache"]["file"]
  assert second["before"] == first["before"] and second["probes"] == {
      **second["probes"],
      "before": first["probes"]["before"],
  }
  for run in ("a", "b"):  # the cached scores are logged as computed ones are
    records = [json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
    assert [r["kind"] for r in records if r["step"] == 0][1:3] == ["eval_before", "eval_probes"]
