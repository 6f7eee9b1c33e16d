"""A data=2 x fsdp=4 mesh of 8 simulated CPU devices trains like one device."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from tiny_run import tiny_config_file

HERE = os.path.dirname(__file__)


@pytest.mark.slow
def test_mesh_losses_match_single_device(tmp_path):
  """EPI with interval 2 refreshes the mask three times in the six steps."""
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  out = subprocess.run(
      [sys.executable, os.path.join(HERE, "mesh_losses.py"), tiny_config_file(tmp_path)],
      env=env,
      capture_output=True,
      text=True,
      timeout=600,
      check=True,
  )
  report = json.loads(out.stdout.strip().splitlines()[-1])
  assert report["devices"] == 8
  assert len(report["single"]) == 6
  np.testing.assert_allclose(report["mesh"], report["single"], rtol=2e-5)
