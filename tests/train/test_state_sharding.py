"""Optimizer state is placed from its parameters' sharding metadata at init, and stays put.

benchmarks/state_sharding.py runs in a subprocess with 8 simulated CPU devices and reports every
leaf's shape, partition spec and bytes per device; here each EPI/Adam state leaf is matched to
its parameter by tree path (independently of the metadata the trainer places it by).
"""

import json
import math
import os
import subprocess
import sys

import pytest

from tiny_run import tiny_config_file

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
FIELDS = ("mu", "nu", "sensitivity", "first_mask", "mask")


@pytest.fixture(
    scope="module",
    params=[("mesh.fsdp=8",), ("mesh.data=2", "mesh.fsdp=4")],
    ids=["fsdp8", "data2_fsdp4"],
)
def placement(request, tmp_path_factory):
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  sets = [arg for override in request.param for arg in ("--set", override)]
  done = subprocess.run(
      [
          sys.executable,
          os.path.join(ROOT, "benchmarks", "state_sharding.py"),
          "--json",
          "--config",
          tiny_config_file(tmp_path_factory.mktemp("config")),
          *sets,
      ],
      env=env,
      capture_output=True,
      text=True,
      timeout=900,
      check=False,
  )
  assert done.returncode == 0, done.stderr[-3000:]
  return json.loads(done.stdout.strip().splitlines()[-1])


def _axes(leaf, mesh):
  """Per dimension, the mesh axes of size > 1 it is split over."""
  return [[a for a in axes if mesh[a] > 1] for axes in leaf["spec"]]


def _expected(leaf, param, mesh):
  """The parameter's axes; a bit-packed last axis keeps its mesh axes only if they divide it."""
  assert leaf["shape"][:-1] == param["shape"][:-1], leaf["path"]
  axes = _axes(param, mesh)
  if leaf["shape"] and leaf["shape"][-1] != param["shape"][-1]:
    assert leaf["shape"][-1] * 8 == param["shape"][-1], leaf["path"]
    if leaf["shape"][-1] % math.prod(mesh[a] for a in axes[-1]):
      axes[-1] = []
  return axes


def test_state_leaves_sharded_like_their_parameter_from_init(placement):
  mesh = placement["mesh"]
  params = {
      leaf["path"][len("[0]") :]: leaf
      for leaf in placement["init"]
      if leaf["path"].startswith("[0]")
  }
  seen = dict.fromkeys(FIELDS, 0)
  sharded_masks = 0
  for leaf in placement["init"]:
    field = next((f for f in FIELDS if f"['{f}']" in leaf["path"]), None)
    if leaf["path"].startswith("[0]"):
      continue
    most = max(leaf["per_device"].values())
    assert len(leaf["per_device"]) == 8, leaf["path"]
    if field is None:  # counters and per-group statistics
      assert most == leaf["full"], leaf["path"]
      continue
    seen[field] += 1
    param = params[leaf["path"].split(f"['{field}']", 1)[1]]
    expected = _expected(leaf, param, mesh)
    assert _axes(leaf, mesh) == expected, leaf["path"]
    assert (most < leaf["full"]) == any(expected), leaf["path"]
    sharded_masks += field.endswith("mask") and most < leaf["full"]
  assert all(n == len(params) for n in seen.values()), seen
  assert sharded_masks >= len(params)  # at least half of the packed masks are split


def test_train_steps_keep_the_placement_and_compile_once(placement):
  assert placement["compiles"] == 1
  for before, after in zip(placement["init"], placement["after"], strict=True):
    assert before["path"] == after["path"]
    assert before["spec"] == after["spec"], before["path"]
    assert before["per_device"] == after["per_device"], before["path"]
