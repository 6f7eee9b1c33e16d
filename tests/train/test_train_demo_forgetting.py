"""The demo's premise: sequential full fine-tuning of the tiny model forgets the first task."""

import os

import pytest

from epi_jax.train.loading import load_config
from epi_jax.train.loop import train

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.mark.slow
def test_sequential_sft_forgets_the_first_task(tmp_path):
  """configs/demo.yaml as sequential SFT, cut to its first two stages (arithmetic, then
  string_code)."""
  config = load_config(
      os.path.join(ROOT, "configs", "demo.yaml"),
      [
          "method.type=multistage",
          "data.tasks=[arithmetic, string_code]",
          "log.progress=false",
          "log.tensorboard=false",
      ],
  )
  summary = train(config, run_dir=str(tmp_path / "run"))
  first = summary["accuracy_matrix"][0]["accuracy"]["arithmetic"]
  assert first > 0
  assert summary["forgetting_ratio"]["arithmetic"] >= 10
