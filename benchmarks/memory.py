"""Where a run's memory goes: the dry-run plan beside what XLA allocates and what the process holds.

For a trainer config (default configs/smollm2/epi.yaml) it builds the run's real state (model
from the checkpoint, optimizer, method) and compiles, without running, the train step and the
evaluation's programs at the config's shapes:

- state: bytes of the parameters, Adam's moments and EPI's sensitivity and masks, as allocated;
- train step: XLA's temporary buffers (gradients, activations, logit chunks, update);
- generation: the eval batch's prompt prefill and decode loop (KV cache included);
- scoring: one eval batch of row log-likelihoods (LogiQA options, held-out NLL);

each beside ``memory_plan``'s prediction. With ``--run`` it then trains through ``train.py``'s
entry point in a child process with the given ``--set`` overrides (e.g. fewer steps) and reports
its peak resident memory, training and evaluations included, and the peak of each phase of the
run (set-up, each evaluation, the first train step with its compilation, the later steps,
checkpoint saves): Linux's ``VmHWM``, reset at each phase's start through
``/proc/self/clear_refs``. Train steps are waited for, so each one's memory lands in its phase.

    python benchmarks/memory.py [--config FILE] [--set KEY=VALUE ...] [--run]
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from epi_jax.eval import generation
from epi_jax.models.generate import _generate
from epi_jax.train.loading import load_config
from epi_jax.train.setup import init_state, num_micro_batches
from epi_jax.train.memory import GIB, memory_plan
from epi_jax.train.methods import make_method
from epi_jax.train.methods.base import Run
from epi_jax.train.model import build_model
from epi_jax.train.sharding import build_mesh, like_params
from epi_jax.models.loss import BATCH_KEYS
from epi_jax.train.step import make_train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _state_bytes(state) -> dict[str, float]:
  """GiB of the split (model, optimizer) state by role, from each leaf's path."""
  out = {"params": 0.0, "adam": 0.0, "epi": 0.0, "other": 0.0}
  for path, leaf in jax.tree_util.tree_flatten_with_path(state)[0]:
    key = jax.tree_util.keystr(path)
    role = (
        "adam"
        if ".mu" in key or ".nu" in key or "'mu'" in key or "'nu'" in key
        else "epi"
        if "sensitivity" in key or "mask" in key
        else "params"
        if "opt_state" not in key and jnp.issubdtype(leaf.dtype, jnp.floating)
        else "other"
    )
    out[role] += leaf.size * leaf.dtype.itemsize / GIB
  return out


def _temp_gib(compiled) -> float:
  return compiled.memory_analysis().temp_size_in_bytes / GIB


def analyze(config) -> dict:
  """The plan and the measured bytes of the state and of each compiled program's temporaries."""
  plan = memory_plan(config)
  mesh = build_mesh(config.mesh)
  method = make_method(config)
  run = Run(
      config=config,
      task_data=None,
      stages=method.stages(),
      stage_steps=[1000],
      mesh=mesh,
      num_micro=num_micro_batches(config.optim),
      resuming=False,
  )
  model = build_model(config.model, seed=0, mesh=mesh)
  trainable = method.trainable(model, run)
  graphdef, state = init_state(trainable.module, trainable.tx, mesh, wrt=trainable.wrt)
  measured = _state_bytes(state)
  b, t = config.optim.batch_size, config.data.seq_len
  batch = {
      k: jax.ShapeDtypeStruct((b, t), jnp.bool_ if k == "loss_mask" else jnp.int32)
      for k in BATCH_KEYS
  }
  step = make_train_step(
      graphdef, run.num_micro, wrt=trainable.wrt, shardings=like_params(state, mesh)
  )
  measured["train_step_temp"] = _temp_gib(step.lower(state, batch).compile())
  e = config.eval
  rows = e.batch_size
  prompt = generation.bucket(t)
  eval_graphdef, eval_state = nnx.split(model)
  ids = jax.ShapeDtypeStruct((rows, prompt), jnp.int32)
  generate = _generate.lower(
      eval_graphdef,
      eval_state,
      ids,
      ids,
      jax.random.key(0),
      jnp.float32(1.0),
      jnp.float32(1.0),
      max_new_tokens=e.max_new_tokens,
      greedy=True,
      eos=(0,),
      pad=0,
  ).compile()
  measured["generation_temp"] = _temp_gib(generate)
  scored = jax.ShapeDtypeStruct((rows, prompt), jnp.bool_)
  scoring = generation._row_loglikelihoods.lower(eval_graphdef, eval_state, ids, ids, scored)
  measured["scoring_temp"] = _temp_gib(scoring.compile())
  return {"plan": plan, "measured": measured}


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    return int(re.search(field + r":\s+(\d+)", f.read()).group(1))


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


class PhasePeaks:
  """Peak resident memory per phase of a run, and the resident memory its last call left. A
  phase's peak excludes the phases it calls; what runs outside every phase counts as
  ``other``."""

  def __init__(self):
    self.peaks: dict[str, float] = {}
    self.after: dict[str, float] = {}
    self.stack = [["other", 0]]
    self.calls: dict[str, int] = {}
    _reset_peak()

  def _fold(self) -> None:
    self.stack[-1][1] = max(self.stack[-1][1], _status_kib("VmHWM"))
    _reset_peak()

  def _close(self) -> None:
    self._fold()
    name, kib = self.stack.pop()
    self.peaks[name] = max(self.peaks.get(name, 0.0), kib / 2**20)
    self.after[name] = _status_kib("VmRSS") / 2**20

  def wrap(self, owner, attr: str, name: str, *, first: str = "", wait=None) -> None:
    """Times ``owner.attr`` as phase ``name`` (its first call as ``first`` when given);
    ``wait(args)`` returns what to block on before the phase ends."""
    fn = getattr(owner, attr)

    @functools.wraps(fn)
    def traced(*args, **kwargs):
      self._fold()
      self.calls[name] = self.calls.get(name, 0) + 1
      self.stack.append([first if first and self.calls[name] == 1 else name, 0])
      try:
        out = fn(*args, **kwargs)
        if wait is not None:
          jax.block_until_ready(wait(args))
        return out
      finally:
        self._close()

    setattr(owner, attr, traced)

  def report(self) -> dict[str, tuple[float, float]]:
    """Per phase (peak GiB, GiB resident after its last call)."""
    while self.stack:
      self._close()
    return {name: (peak, self.after[name]) for name, peak in self.peaks.items()}


def traced_train(argv: list[str], out_path: str) -> None:
  """``train.py argv`` with each phase's peak resident GiB written to ``out_path``."""
  from epi_jax.train import analyses, cli, loop

  peaks = PhasePeaks()
  peaks.wrap(loop, "load_tasks", "data")
  peaks.wrap(loop, "setup_run", "set-up: model, optimizer state")
  session = loop._Session

  def state(args):
    return args[0].state

  peaks.wrap(session, "_train_step", "train steps", first="first train step (compiles)", wait=state)
  peaks.wrap(session, "_save", "checkpoint save")
  peaks.wrap(session, "_evaluate", "evaluation: task metrics")
  peaks.wrap(analyses.RunAnalyses, "before_training", "analyses before training")
  peaks.wrap(analyses.RunAnalyses, "after_stage", "analyses after a stage")
  peaks.wrap(session, "finish", "summary and export")
  rc = cli.main(argv)
  with open(out_path, "w") as f:
    json.dump({"rc": rc, "peaks_gib": peaks.report()}, f)


def peak_rss_of_run(config_path: str, overrides: list[str], run_dir: str) -> dict:
  """Trains through train.py's entry point in a child process: its peak resident GiB (the
  largest phase's: resetting the peak also resets the child's rusage), each phase's peak and
  resident GiB after it, and the wall time."""
  argv = ["--config", config_path]
  for item in [*overrides, f"run_dir={run_dir}", "log.progress=false"]:
    argv += ["--set", item]
  out_path = run_dir + ".phases.json"
  start = time.perf_counter()
  subprocess.run([sys.executable, __file__, "--trace-child", out_path, "--", *argv], check=True)
  wall = time.perf_counter() - start
  with open(out_path) as f:
    phases = json.load(f)["peaks_gib"]
  return {"peak_rss_gib": max(p for p, _ in phases.values()), "phases_gib": phases, "wall_s": wall}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default=os.path.join(ROOT, "configs", "smollm2", "epi.yaml"))
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
  parser.add_argument("--run", action="store_true", help="also train through train.py")
  parser.add_argument("--run-dir", default="/tmp/epi_jax_memory_run")
  parser.add_argument("--trace-child", metavar="OUT", help=argparse.SUPPRESS)
  parser.add_argument("train_argv", nargs="*", help=argparse.SUPPRESS)
  args = parser.parse_args()
  if args.trace_child:
    traced_train(args.train_argv, args.trace_child)
    return
  config = load_config(args.config, args.set)
  result = analyze(config)
  plan, got = result["plan"], result["measured"]
  epi = plan["methods"]["epi"].get(f"grad_sq_{config.method.sensitivity_dtype}", {})
  rows = [
      ("parameters", plan["params_gib"], got["params"]),
      ("Adam mu + nu", plan["adam_moments_gib"], got["adam"]),
      (
          "EPI sensitivity + masks",
          epi.get("sensitivity_gib", 0) + epi.get("mask_gib", 0),
          got["epi"],
      ),
      (
          "train step: gradients + activations",
          plan["grads_gib"] + plan["activations_gib"],
          got["train_step_temp"],
      ),
      ("evaluation: generation", plan.get("generation_gib", float("nan")), got["generation_temp"]),
      ("evaluation: scoring", plan.get("scoring_gib", float("nan")), got["scoring_temp"]),
  ]
  print(f"{args.config} {' '.join(args.set)}")
  print("| component | plan GiB | measured GiB | measured / plan |")
  print("|---|---|---|---|")
  for name, want, have in rows:
    print(f"| {name} | {want:.3f} | {have:.3f} | {have / want if want else float('nan'):.2f} |")
  if args.run:
    out = peak_rss_of_run(args.config, args.set, args.run_dir)
    print(
        f"train.py peak resident memory {out['peak_rss_gib']:.2f} GiB, wall {out['wall_s']:.0f} s"
    )
    print("| phase of the run | peak resident GiB | resident after GiB |")
    print("|---|---|---|")
    for name, (peak, after) in out["phases_gib"].items():
      print(f"| {name} | {peak:.2f} | {after:.2f} |")


if __name__ == "__main__":
  main()
