"""Sharded loading and forward passes on 8 simulated CPU devices, and the logical-axis rules."""

import json
import os
import pathlib
import subprocess
import sys

import pytest
from flax import nnx
from jax.sharding import AbstractMesh, PartitionSpec

from epi_jax.models import Decoder, ModelConfig, save_pretrained
from epi_jax.models.sharding import logical_spec

HELPER = pathlib.Path(__file__).with_name("sharded_forward.py")


def test_sharded_logits_equal_unsharded_on_8_devices(tmp_path):
  paths = []
  for family in ("gemma2", "qwen2"):  # tied head + sandwich norms; qkv biases
    config = ModelConfig.tiny(family)
    save_pretrained(Decoder(config, rngs=nnx.Rngs(1)), config, tmp_path / family)
    paths.append(str(tmp_path / family))
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
  run = subprocess.run(
      [sys.executable, str(HELPER), *paths],
      env=env,
      capture_output=True,
      text=True,
      timeout=300,
      check=False,
  )
  assert run.returncode == 0, run.stderr[-3000:]
  reports = json.loads(run.stdout.strip().splitlines()[-1])
  for path, report in reports.items():
    assert report["devices"] == 8, path
    assert report["q_spec"] == ["fsdp", "tensor"], path  # embed -> fsdp, q_heads -> tensor
    assert report["q_shard_shape"] == [32, 2, 16], path  # 1/4 of [64, 4, 16] per device
    assert report["logits_sharding_devices"] == 8, path
    assert report["max_abs_diff"] < 1e-5, path
    assert report["greedy_equal"], path


@pytest.mark.parametrize(
    "names, shape, expected",
    [
        (("embed", "q_heads", "head_dim"), (4096, 32, 128), PartitionSpec("fsdp", "tensor", None)),
        (("embed", "kv_heads", "head_dim"), (3584, 4, 128), PartitionSpec("fsdp", None, None)),
        (("vocab", "embed"), (256_000, 3584), PartitionSpec("tensor", "fsdp")),
        (("norm",), (3584,), PartitionSpec(None)),
        (("batch", None), (16, 128), PartitionSpec(("data", "fsdp"), None)),
        (("batch", None), (2, 128), PartitionSpec(None, None)),
    ],
)
def test_logical_spec_replicates_what_the_mesh_does_not_divide(names, shape, expected):
  mesh = AbstractMesh((2, 2, 8), ("data", "fsdp", "tensor"))
  assert logical_spec(names, shape, mesh) == expected
