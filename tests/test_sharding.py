"""EPI under jit on a 2x4 mesh of simulated CPU devices equals the single-device run."""

import json
import os
import pathlib
import subprocess
import sys

import pytest


@pytest.fixture(scope="module")
def sharded_run():
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  script = pathlib.Path(__file__).with_name("sharded_epi.py")
  done = subprocess.run(
      [sys.executable, str(script)],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      check=False,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("sensitivity", ["grad_sq", "adam_nu"])
def test_sharded_equals_single_device(sharded_run, sensitivity):
  result = sharded_run[sensitivity]
  assert result["devices"] == 8
  assert result["protected"] > 0
  assert result["same_mask"]
  assert result["params_close"]
  assert result["state_sharded_like_params"]
