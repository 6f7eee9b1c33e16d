"""Two processes x 4 simulated CPU devices (gloo collectives over localhost) train through
train.py like one process x 8 devices, bit for bit, and resume across processes.

Every run is the tiny EPI config on a data=2 x fsdp=4 mesh; the processes find each other
through JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID (epi_jax.train.distributed).
Bit-identity needs the same collectives on both sides: a distributed run sums across devices
with gloo, whose all-reduce adds the 8 shards in another order than the in-process CPU
all-reduce of a plain single-process run (which adds them in device order), so the reference is
one process x 8 devices joined as a distributed run of one process (gloo too); the plain
single-process run agrees to float32 rounding, with the same masks.
"""

import json
import os
import shutil
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from epi_jax.train.distributed import initialize_from_env
from tiny_run import TINY_YAML

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = TINY_YAML + "mesh: {data: 2, fsdp: 4}\n"  # checkpoint.mask_history: full


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def launch(config: str, run_dir, processes: int, *args: str, distributed: bool = True) -> float:
  """Runs train.py in ``processes`` processes holding 8 // processes CPU devices each, joined as
  one distributed run unless not ``distributed``; returns the wall time in seconds."""
  env = {k: v for k, v in os.environ.items() if not k.startswith("JAX_")}
  env.update(
      JAX_PLATFORMS="cpu", XLA_FLAGS=f"--xla_force_host_platform_device_count={8 // processes}"
  )
  if distributed:
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{_free_port()}", JAX_NUM_PROCESSES=str(processes)
    )
  command = [
      sys.executable,
      os.path.join(ROOT, "train.py"),
      "--config",
      config,
      "--run-dir",
      str(run_dir),
      *args,
  ]
  start = time.perf_counter()
  running = [
      subprocess.Popen(
          command,
          env=env | ({"JAX_PROCESS_ID": str(i)} if distributed else {}),
          stdout=subprocess.PIPE,
          stderr=subprocess.PIPE,
          text=True,
      )
      for i in range(processes)
  ]
  try:
    outputs = [p.communicate(timeout=1200) for p in running]
  finally:
    for p in running:
      if p.poll() is None:
        p.kill()
  for i, (p, (_, err)) in enumerate(zip(running, outputs)):
    assert p.returncode == 0, f"process {i} of {processes}:\n{err[-4000:]}"
  return time.perf_counter() - start


def final_state(run_dir, item: str = "state") -> dict[str, np.ndarray]:
  """Every array of an item of the last checkpoint, by path: the (model, optimizer) state, or
  the masks of every refresh."""
  checkpoints = run_dir / "checkpoints"
  path = checkpoints / str(max(int(p.name) for p in checkpoints.iterdir())) / item
  checkpointer = ocp.StandardCheckpointer()
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=device),
      checkpointer.metadata(path).item_metadata,
  )
  state = checkpointer.restore(path, abstract)
  return {
      jax.tree_util.keystr(p): np.asarray(x)
      for p, x in jax.tree_util.tree_flatten_with_path(state)[0]
  }


def records(run_dir) -> list[dict]:
  """metrics.jsonl without its timing fields."""
  with open(run_dir / "metrics.jsonl") as f:
    return [
        {k: v for k, v in json.loads(line).items() if k not in ("tokens_per_s", "eval_time_s")}
        for line in f
    ]


def summary(run_dir) -> dict:
  return json.loads((run_dir / "summary.json").read_text())


def test_initialize_from_env_joins_only_when_asked():
  assert initialize_from_env({"XLA_FLAGS": "--xla_force_host_platform_device_count=8"}) is False
  with pytest.raises(ValueError, match="JAX_PROCESS_ID='first'"):
    initialize_from_env({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "first"})


def _counts(mask_history: list[dict]) -> list[tuple]:
  return [(r["step"], r["protected"], r["locked"], r["freed"]) for r in mask_history]


@pytest.mark.slow
def test_two_processes_train_and_resume_like_one(tmp_path):
  config = tmp_path / "tiny.yaml"
  config.write_text(CONFIG)
  times = {
      "1 process x 8 devices, plain": launch(str(config), tmp_path / "plain", 1, distributed=False),
      "1 process x 8 devices, gloo": launch(str(config), tmp_path / "one", 1),
      "2 processes x 4 devices": launch(str(config), tmp_path / "two", 2),
  }
  one, two = summary(tmp_path / "one"), summary(tmp_path / "two")
  assert two["params_sha256"] == one["params_sha256"]
  assert two["mask_history"] == one["mask_history"]
  assert [r["step"] for r in two["mask_history"]] == [2, 4, 6]
  assert two["accuracy_matrix"] == one["accuracy_matrix"]
  state_one, state_two = final_state(tmp_path / "one"), final_state(tmp_path / "two")
  assert state_one.keys() == state_two.keys()
  masks = [k for k in state_one if "['mask']" in k]
  assert masks and sum(int(np.unpackbits(state_two[k]).sum()) for k in masks) > 0
  for key in state_one:  # parameters, Adam moments, sensitivity, masks, counters
    np.testing.assert_array_equal(state_two[key], state_one[key], err_msg=key)
  history_one, history_two = final_state(tmp_path / "one", "masks"), final_state(
      tmp_path / "two", "masks"
  )
  assert history_one.keys() == history_two.keys() and len(history_two) == 3 * len(masks)
  for key in history_one:  # the mask of every refresh, gathered from both processes
    np.testing.assert_array_equal(history_two[key], history_one[key], err_msg=key)
  # Only process 0 writes metrics.jsonl: one record per event, as with one process.
  assert records(tmp_path / "two") == records(tmp_path / "one")

  # The plain single-process run: other rounding in the cross-device sums, the same masks.
  plain, state_plain = summary(tmp_path / "plain"), final_state(tmp_path / "plain")
  assert _counts(plain["mask_history"]) == _counts(two["mask_history"])
  for key in masks:
    np.testing.assert_array_equal(state_two[key], state_plain[key], err_msg=key)
  # Adam's 1/sqrt(nu) scales a last-bit gradient difference where nu is small: 3.8e-6 measured.
  for key in (k for k in state_plain if k.startswith("['0']")):  # the parameters
    np.testing.assert_allclose(state_two[key], state_plain[key], rtol=0, atol=1e-5, err_msg=key)

  # Stop at checkpoint 4 (mid stage 1): keep what an interrupted run leaves, then resume with
  # two processes.
  shutil.copytree(tmp_path / "two", tmp_path / "cut")
  shutil.rmtree(tmp_path / "cut" / "checkpoints" / "6")
  (tmp_path / "cut" / "summary.json").unlink()
  times["2 processes, resumed from step 4"] = launch(str(config), tmp_path / "cut", 2, "--resume")
  resumed = summary(tmp_path / "cut")
  assert resumed["params_sha256"] == two["params_sha256"]
  assert resumed["mask_history"] == two["mask_history"]
  assert records(tmp_path / "cut") == records(tmp_path / "two")
  final = final_state(tmp_path / "cut")
  for key in state_two:
    np.testing.assert_array_equal(final[key], state_two[key], err_msg=key)
  print(
      f"\nparams_sha256 {two['params_sha256']}: 1 x 8 (gloo), 2 x 4, 2 x 4 resumed; "
      f"plain 1 x 8: {plain['params_sha256']}"
  )
  for name, seconds in times.items():
    print(f"{name}: {seconds:.1f} s")
