"""Resume: an interrupted run continued with --resume ends bit-identical to an uninterrupted one."""

import json
import shutil

import pytest

from epi_jax.train.loading import ConfigError, load_config
from epi_jax.train.loop import train
from tiny_run import tiny_config_file


def records(run_dir, kind):
  with open(run_dir / "metrics.jsonl") as f:
    return [r for r in map(json.loads, f) if r["kind"] == kind]


def train_losses(run_dir):
  return [(r["step"], r["loss"]) for r in records(run_dir, "train")]


@pytest.mark.slow
def test_resume_is_bit_identical_and_refuses_a_changed_config(tmp_path):
  packed = ["data.pack=true", "data.pack_window=16"]  # a resume mid-window: pending rows
  config = load_config(tiny_config_file(tmp_path), packed)
  full = train(config, run_dir=str(tmp_path / "full"))
  assert sorted(int(p.name) for p in (tmp_path / "full" / "checkpoints").iterdir()) == [2, 3, 4, 6]
  assert list((tmp_path / "full" / "tensorboard").glob("events.out.tfevents.*"))
  assert (tmp_path / "full" / "config.yaml").exists()

  # Interrupt after step 4 (mid stage 1): keep checkpoints up to 4, drop the rest and the summary.
  shutil.copytree(tmp_path / "full", tmp_path / "cut")
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "6")
  (tmp_path / "cut" / "summary.json").unlink()
  changed = load_config(tiny_config_file(tmp_path), [*packed, "method.p=0.1", "log.every=5"])
  with pytest.raises(ConfigError) as error:
    train(changed, run_dir=str(tmp_path / "cut"), resume=True)
  assert "method.p" in str(error.value) and "log.every" not in str(error.value)

  resumed = train(config, run_dir=str(tmp_path / "cut"), resume=True)
  assert resumed["params_sha256"] == full["params_sha256"]
  assert resumed["accuracy_matrix"] == full["accuracy_matrix"]
  assert resumed["mask_history"] == full["mask_history"]
  assert train_losses(tmp_path / "cut") == train_losses(tmp_path / "full")
  # The run's length, written once at its start (the live progress of epi_jax.progress).
  plan = [{"kind": "plan", "step": 0, "total_steps": 6, "stages": 2}]
  assert records(tmp_path / "cut", "plan") == records(tmp_path / "full", "plan") == plan
  assert [r["step"] for r in full["mask_history"]] == [2, 4, 6]
  summary = json.loads((tmp_path / "cut" / "summary.json").read_text())
  assert summary["params_sha256"] == full["params_sha256"]
  with pytest.raises(ConfigError, match="nothing to resume"):
    train(config, run_dir=str(tmp_path / "empty"), resume=True)
  assert len(summary["accuracy_matrix"]) == 2 and set(summary["forgetting_ratio"]) == {
      "logic_choice",
      "rewrite",
  }
