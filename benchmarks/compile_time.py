"""Compile time of the whole SmolLM2-135M train step, AdamW (multistage) vs EPI, both layouts.

The step is the trainer's own: ``configs/smollm2/epi.yaml`` with a random-init SmolLM2-135M
(``model.preset=smollm2_135m``), the method's optax transformation and step logs, and
``make_train_step`` with the state's shardings. Everything is abstract (``nnx.eval_shape``,
``jax.ShapeDtypeStruct``): nothing is allocated and nothing runs. Each compile is a fresh
``jit(...).lower(...).compile()`` with JAX's in-memory caches cleared and the persistent
compilation cache off. AdamW and EPI compile round-robin, ``--repeats`` rounds; the table
gives medians of the times and of each round's EPI / AdamW ratio, for wall time and for the
process's CPU time (which a busy machine inflates far less), and the extra temporary memory of
EPI's compiled step (``memory_analysis``). ``--split`` also compiles EPI with its refresh
branch taken out (the mask kept as it is: the sensitivity EMA and the masked update remain),
which splits EPI's extra time between the per-step work and the refresh.

    python benchmarks/compile_time.py [--repeats 3] [--batch 1] [--seq 128] [--layouts both]
        [--split]
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import time

import jax
import jax.numpy as jnp
from flax import nnx

from epi_jax._src import epi as epi_impl
from epi_jax.train.loading import load_config
from epi_jax.train.methods import Run, make_method
from epi_jax.train.model import abstract_model
from epi_jax.train.sharding import build_mesh, like_params
from epi_jax.models.loss import BATCH_KEYS
from epi_jax.train.step import make_train_step

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "smollm2", "epi.yaml")
METHODS = ("multistage", "epi")


@contextlib.contextmanager
def refresh_removed():
  """EPI's update with ``evolve_mask`` keeping the previous mask: no refresh branch."""
  real = epi_impl.evolve_mask
  epi_impl.evolve_mask = lambda selector, scores, mask, first, stats, *_: (mask, first, stats)
  try:
    yield
  finally:
    epi_impl.evolve_mask = real


class AbstractStep:
  """The trainer's train step of one method and layout, on abstract state and batch."""

  def __init__(self, method: str, scan: bool, batch: int, seq: int):
    config = load_config(
        CONFIG,
        [
            "model.checkpoint=''",
            "model.preset=smollm2_135m",
            f"model.scan_layers={str(scan).lower()}",
            f"method.type={method}",
        ],
    )
    self.method = make_method(config)
    run = Run(
        config=config,
        task_data=None,
        stages=self.method.stages(),
        stage_steps=[100],
        mesh=build_mesh(config.mesh),
        num_micro=1,
        resuming=False,
    )

    trainable = self.method.trainable(abstract_model(config.model), run)
    self.wrt = trainable.wrt
    optimizer = nnx.eval_shape(
        lambda module: nnx.Optimizer(module, trainable.tx, wrt=trainable.wrt), trainable.module
    )
    self.graphdef, self.state = nnx.split((trainable.module, optimizer))
    self.shardings = like_params(self.state, run.mesh)
    self.batch = {k: jax.ShapeDtypeStruct((batch, seq), jnp.int32) for k in BATCH_KEYS}
    self.batch["loss_mask"] = jax.ShapeDtypeStruct((batch, seq), jnp.float32)

  def compile(self) -> dict[str, float]:
    """Seconds of a fresh trace + lower and XLA compile (wall and process CPU time), and the
    compiled step's temporary bytes."""
    jax.clear_caches()
    step = make_train_step(
        self.graphdef, 1, wrt=self.wrt, logs=self.method.step_logs, shardings=self.shardings
    )
    wall, cpu = time.perf_counter(), time.process_time()
    lowered = step.lower(self.state, self.batch)
    lower_wall, lower_cpu = time.perf_counter() - wall, time.process_time() - cpu
    compiled = lowered.compile()
    memory = compiled.memory_analysis()
    return {
        "lower": lower_wall,
        "compile": time.perf_counter() - wall - lower_wall,
        "total": time.perf_counter() - wall,
        "cpu": time.process_time() - cpu,
        "lower_cpu": lower_cpu,
        "temp": getattr(memory, "temp_size_in_bytes", float("nan")),
    }


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument("--batch", type=int, default=1)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--layouts", choices=("both", "unscanned", "scanned"), default="both")
  parser.add_argument("--split", action="store_true", help="also EPI without its refresh")
  args = parser.parse_args()
  jax.config.update("jax_enable_compilation_cache", False)
  layouts = {"both": (False, True), "unscanned": (False,), "scanned": (True,)}[args.layouts]
  print(
      f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}; SmolLM2-135M "
      f"float32, batch {args.batch} x {args.seq}; fresh lower + compile, round-robin, median of "
      f"{args.repeats}"
  )
  split = " EPI without refresh CPU s (/ AdamW) |" if args.split else ""
  print(
      "| layers | AdamW lower + compile s | EPI lower + compile s | EPI / AdamW wall | "
      f"AdamW CPU s | EPI CPU s | EPI / AdamW CPU | EPI - AdamW temp MiB |{split}"
  )
  print("|---|---|---|---|---|---|---|---|" + "---|" * bool(split))

  def compile_round(steps: dict[str, AbstractStep]) -> dict[str, dict[str, float]]:
    times = {m: step.compile() for m, step in steps.items()}
    if args.split:
      with refresh_removed():
        times["no_refresh"] = steps["epi"].compile()
    return times

  for scan in layouts:
    steps = {m: AbstractStep(m, scan, args.batch, args.seq) for m in METHODS}
    rounds = [compile_round(steps) for _ in range(args.repeats)]
    med = lambda f: statistics.median(f(r) for r in rounds)
    a = lambda key: med(lambda r: r["multistage"][key])
    e = lambda key: med(lambda r: r["epi"][key])
    ratio = lambda key: med(lambda r: r["epi"][key] / r["multistage"][key])
    print(
        f"| {'scanned' if scan else 'unscanned'} | {a('lower'):.1f} + {a('compile'):.1f} | "
        f"{e('lower'):.1f} + {e('compile'):.1f} | {ratio('total'):.2f} | {a('cpu'):.1f} | "
        f"{e('cpu'):.1f} | {ratio('cpu'):.2f} | "
        f"{(rounds[-1]['epi']['temp'] - rounds[-1]['multistage']['temp']) / 2**20:.0f} |"
        + (
            f" {med(lambda r: r['no_refresh']['cpu']):.1f} "
            f"({med(lambda r: r['no_refresh']['cpu'] / r['multistage']['cpu']):.2f}) |"
            if args.split
            else ""
        ),
        flush=True,
    )


if __name__ == "__main__":
  main()
