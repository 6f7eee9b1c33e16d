"""benchmarks/gpu.py: the model sizes and FLOP counts against a NumPy float64 count from the
shapes, the no-accelerator exit, the deadline, and the whole run on CPU with the tiny llama (its
table, and JSON fields consistent with each other and with the trainer's dry-run plan)."""

import importlib.util
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest

from epi_jax.models import ModelConfig
from epi_jax.train.config import Config, DataSection, ModelSection, OptimSection
from epi_jax.train.memory import memory_plan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BENCH = os.path.join(ROOT, "benchmarks")
REPEATS = 2
TIMED = (
    "adamw_step_s",
    "epi_step_s",
    "refresh_step_s",
    "compile_adamw_s",
    "compile_epi_s",
    "compile_refresh_s",
    "xla_epi_gib",
    "xla_refresh_gib",
)


@pytest.fixture(scope="module")
def gpu():
  sys.path.insert(0, BENCH)  # gpu.py imports its neighbours optimizer.py and train_step.py
  try:
    spec = importlib.util.spec_from_file_location("bench_gpu", os.path.join(BENCH, "gpu.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclass resolves annotations through it
    spec.loader.exec_module(module)
  finally:
    sys.path.remove(BENCH)
  return module


def reference_counts(c: ModelConfig) -> tuple[float, float]:
  """(all parameters, matmul parameters) of a llama from its shapes, float64."""
  d, q, kv = np.float64(c.hidden_size), c.num_heads * c.head_dim, c.num_kv_heads * c.head_dim
  block = d * q + 2 * d * kv + q * d + 3 * d * c.intermediate_size + 2 * d
  embed = c.vocab_size * d
  head = 0 if c.tie_word_embeddings else embed
  total = embed + c.num_layers * block + d + head
  return total, total - (0 if c.tie_word_embeddings else embed)


def reference_flops(c: ModelConfig, matmul: float, batch: int, seq: int) -> float:
  tokens = np.float64(batch * seq)
  return 6 * matmul * tokens + 12 * c.num_layers * c.num_heads * c.head_dim * seq * tokens


def test_model_sizes_and_flops(gpu):
  benches = {b.name: b for b in gpu.benches(tiny=False)}
  assert list(benches) == ["SmolLM2-135M", "LLaMA-1.1B"]
  assert [gpu.parameter_counts(b.config) for b in benches.values()] == [
      (134_515_008, 134_515_008),
      (1_134_596_096, 1_003_524_096),
  ]
  for b in [*benches.values(), *gpu.benches(tiny=True)]:
    total, matmul = reference_counts(b.config)
    assert gpu.parameter_counts(b.config) == (total, matmul), b.name
    flops = gpu.step_flops(b.config, matmul, b.batch, b.seq)
    assert flops == pytest.approx(reference_flops(b.config, matmul, b.batch, b.seq), rel=1e-12)
  # The expected H100 runtime in the docstring rests on these.
  assert gpu.step_flops(benches["LLaMA-1.1B"].config, 1_003_524_096, 8, 1024) / 1e12 == (
      pytest.approx(51.0, abs=0.05)
  )


def test_no_accelerator_exits_0_and_writes_nothing(gpu, tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert gpu.main(["--json", str(out)]) == 0
  assert "no accelerator found" in capsys.readouterr().out
  assert not out.exists()


def test_allow_cpu_needs_tiny(gpu, tmp_path, capsys):
  assert gpu.main(["--allow-cpu", "--json", str(tmp_path / "b.json")]) == 2
  assert "--tiny" in capsys.readouterr().err


def test_deadline_skips_every_phase(gpu, tmp_path, capsys):
  out = tmp_path / "bench.json"
  assert gpu.main(["--allow-cpu", "--tiny", "--budget-s", "0", "--json", str(out)]) == 0
  result = json.loads(out.read_text())
  assert [s.split(":")[0] for s in result["skipped"]] == ["tiny llama EPI steps"]
  (row,) = result["rows"]
  assert row["plan_gib"] > 0 and not set(TIMED) & set(row)
  assert "| tiny llama |" in capsys.readouterr().out


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
  out = tmp_path_factory.mktemp("bench") / "bench.json"
  proc = subprocess.run(
      [
          sys.executable,
          os.path.join(BENCH, "gpu.py"),
          "--allow-cpu",
          "--tiny",
          "--repeats",
          str(REPEATS),
          "--json",
          str(out),
      ],
      capture_output=True,
      text=True,
      timeout=600,
      env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout, json.loads(out.read_text())


def test_tiny_run_prints_the_table(tiny_run):
  stdout, _ = tiny_run
  lines = stdout.splitlines()
  header = next(i for i, line in enumerate(lines) if line.startswith("| model |"))
  assert "MFU" in lines[header] and "refresh (AdamW steps)" in lines[header]
  row = lines[header + 2]
  assert row.startswith("| tiny llama |") and row.count("|") == lines[header].count("|")
  assert "n/a" in row  # no device memory statistics on CPU


def test_tiny_run_json_fields_agree(tiny_run):
  _, result = tiny_run
  assert result["backend"] == "cpu" and result["skipped"] == [] and result["bf16_peak_flops"] > 0
  (row,) = result["rows"]
  c = ModelConfig.tiny("llama")
  total, matmul = reference_counts(c)
  assert (row["params"], row["matmul_params"]) == (total, matmul)
  tokens = row["batch"] * row["seq"]
  assert row["flops_per_step"] == pytest.approx(
      reference_flops(c, matmul, row["batch"], row["seq"]), rel=1e-12
  )
  for key in TIMED:
    assert math.isfinite(row[key]) and row[key] > 0, key
  t, peak = row["adamw_step_s"], result["bf16_peak_flops"]
  assert row["tokens_per_s"] == pytest.approx(tokens / t)
  assert row["mfu_adamw"] == pytest.approx(row["flops_per_step"] / t / peak)
  assert row["mfu_epi"] == pytest.approx(row["flops_per_step"] / row["epi_step_s"] / peak)
  assert row["epi_over_adamw"] == pytest.approx(row["epi_step_s"] / t)
  assert row["refresh_adamw_steps"] == pytest.approx(
      (row["refresh_step_s"] - row["epi_step_s"]) / t
  )
  # Refreshes only in the interval=1 step: once in the memory phase, once warming up, then timed.
  assert row["refreshes"] == REPEATS + 2
  assert row["peak_gib"] is None  # CPU: no memory_stats
  # The dry-run plan of the same setup, reached through the tiny preset instead of the override.
  config = Config(
      model=ModelSection(dtype="float32", compute_dtype="bfloat16", scan_layers=True, remat="dots"),
      data=DataSection(seq_len=row["seq"]),
      optim=OptimSection(batch_size=row["batch"]),
  )
  plan = memory_plan(config)
  assert plan["parameters"] == row["params"]
  assert row["plan_gib"] == pytest.approx(plan["methods"]["epi"]["grad_sq_float32"]["total_gib"])
