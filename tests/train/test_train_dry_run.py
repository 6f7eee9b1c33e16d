"""--dry-run of every shipped config, the paper's 7-9B ones included, from shapes alone."""

import dataclasses
import glob
import os
import subprocess
import sys

import pytest

from epi_jax.models import ModelConfig
from epi_jax.train.loading import load_config
from epi_jax.train.memory import memory_plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIGS = sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.yaml"), recursive=True))
BILLIONS = {"llama3_8b": 8.03, "mistral_7b": 7.24, "qwen2_7b": 7.62, "gemma2_9b": 9.24}


def test_every_paper_backbone_has_a_config():
  names = {os.path.basename(p)[:-5] for p in CONFIGS}
  assert {"demo", "cpu", "smollm2"} | set(BILLIONS) <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, ROOT))
def test_memory_plan(path):
  config = load_config(path)
  plan = memory_plan(config)
  if config.model.preset in BILLIONS:
    assert plan["parameters"] / 1e9 == pytest.approx(BILLIONS[config.model.preset], abs=0.01)
    # float32 master weights over fsdp=8: 4 bytes per parameter split 8 ways (replicated norms
    # aside); gradients the same, Adam's two moments twice that.
    assert plan["params_gib"] == pytest.approx(plan["parameters"] * 4 / 8 / 2**30, rel=0.01)
    assert plan["grads_gib"] == pytest.approx(plan["params_gib"])
    assert plan["adam_moments_gib"] == pytest.approx(2 * plan["params_gib"])
  epi = plan["methods"]["epi"]
  assert epi["adam_nu"]["sensitivity_gib"] == 0
  assert epi["grad_sq_float32"]["sensitivity_gib"] == pytest.approx(
      2 * epi["grad_sq_bfloat16"]["sensitivity_gib"]
  )
  assert plan["activations_gib"] > 0


def test_bfloat16_parameters_halve_only_themselves():
  """bfloat16 master weights: gradients and optimizer state stay float32 (make_optimizer)."""
  path = os.path.join(ROOT, "configs", "paper", "llama3_8b.yaml")
  full = memory_plan(load_config(path))
  half = memory_plan(load_config(path, ["model.dtype=bfloat16"]))
  assert half["params_gib"] == pytest.approx(full["params_gib"] / 2, rel=1e-3)
  for key in ("grads_gib", "adam_moments_gib", "activations_gib"):
    assert half[key] == pytest.approx(full[key]), key


def test_architecture_stands_in_for_the_preset():
  """``memory_plan(config, architecture=...)``: shapes no preset names (benchmarks/gpu.py's)."""
  config = load_config(os.path.join(ROOT, "configs", "paper", "llama3_8b.yaml"))
  named = memory_plan(config)
  tiny = dataclasses.replace(config, model=dataclasses.replace(config.model, preset="tiny"))
  assert memory_plan(tiny)["parameters"] < 1e6
  assert memory_plan(tiny, architecture=ModelConfig.llama3_8b()) == named
  blocks = dataclasses.replace(ModelConfig.llama3_8b(), num_layers=4, vocab_size=32_000)
  short = memory_plan(config, architecture=blocks)
  # 4 x 218,112,000 per block + 2 x 32,000 x 4096 untied embeddings + the final norm.
  assert short["parameters"] == 4 * 218_112_000 + 2 * 32_000 * 4096 + 4096
  assert short["activations_gib"] < named["activations_gib"]


def test_cli_dry_run_prints_the_plan():
  out = subprocess.run(
      [
          sys.executable,
          os.path.join(ROOT, "train.py"),
          "--config",
          os.path.join(ROOT, "configs", "paper", "gemma2_9b.yaml"),
          "--dry-run",
      ],
      capture_output=True,
      text=True,
      check=True,
      timeout=300,
  )
  assert "9.24B" in out.stdout and "adam_nu" in out.stdout and "per-device" in out.stdout


def test_cli_config_error_names_file_and_key(tmp_path):
  out = subprocess.run(
      [
          sys.executable,
          os.path.join(ROOT, "train.py"),
          "--config",
          os.path.join(ROOT, "configs", "demo.yaml"),
          "--set",
          "method.pp=1",
          "--dry-run",
      ],
      capture_output=True,
      text=True,
      timeout=300,
  )
  assert out.returncode == 2
  assert "configs/demo.yaml" in out.stderr and "method.pp" in out.stderr
