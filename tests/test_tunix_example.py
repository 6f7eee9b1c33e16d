"""examples/tunix_epi.py in google-tunix's own environment (``make tunix-env``): EPI, given to
tunix's ``PeftTrainer`` as its optax optimizer, protects its top-p entries at every step."""

import math
import os
import pathlib
import subprocess

import numpy as np
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
TUNIX_PYTHON = pathlib.Path(os.environ.get("EPI_TUNIX_PYTHON", ROOT / ".venv-tunix/bin/python"))
READY = TUNIX_PYTHON.exists() and (
    "EPI_TUNIX_PYTHON" in os.environ or (ROOT / ".venv-tunix/.installed").exists()
)

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not READY,
        reason=f"no google-tunix environment at {TUNIX_PYTHON}: `make tunix-env` builds it "
        "(or set EPI_TUNIX_PYTHON); tunix pins safetensors<0.8, so it cannot share .venv",
    ),
]

STEPS, INTERVAL, P = 6, 2, 0.05


def _snapshot(trace, kind: str, t: int) -> list[np.ndarray]:
  count = sum(1 for k in trace.files if k.startswith(f"{kind}_0_"))
  return [trace[f"{kind}_{t}_{i}"] for i in range(count)]


def test_epi_mask_holds_inside_tunix_trainer(tmp_path):
  out = tmp_path / "trace.npz"
  args = ["--steps", STEPS, "--interval", INTERVAL, "--p", P, "--out", out]
  env = os.environ | {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run(
      [str(TUNIX_PYTHON), "examples/tunix_epi.py", *map(str, args)],
      cwd=ROOT,
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
  )
  output = proc.stdout[-2000:] + proc.stderr[-4000:]
  assert out.exists(), output
  trace = np.load(out)
  # The trainer advanced EPI's state once per step: refreshes at t % H == 0 only.
  expected = [False] + [t % INTERVAL == 0 for t in range(1, STEPS + 1)]
  np.testing.assert_array_equal(trace["refreshed"], expected)
  total = sum(x.size for x in _snapshot(trace, "param", 0))
  k = math.floor(P * total)
  for t in range(1, STEPS + 1):
    before, after = _snapshot(trace, "param", t - 1), _snapshot(trace, "param", t)
    mask = _snapshot(trace, "mask", t)
    protected = sum(int(m.sum()) for m in mask)
    assert protected == (k if t >= INTERVAL else 0), t
    if not expected[t]:
      for m, prev in zip(mask, _snapshot(trace, "mask", t - 1)):
        np.testing.assert_array_equal(m, prev)
    moved = [a != b for a, b in zip(after, before)]
    assert sum(int(np.sum(d & m)) for d, m in zip(moved, mask)) == 0, t
    free_moved = sum(int(np.sum(d & ~m)) for d, m in zip(moved, mask))
    assert free_moved > 0.99 * (total - protected), t
  losses = trace["loss"]
  assert len(losses) == STEPS and losses[-1] < losses[0]
  assert proc.returncode == 0, output  # the example's own check agrees
