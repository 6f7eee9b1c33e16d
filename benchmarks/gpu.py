"""Whole training steps on the accelerator JAX sees: throughput, MFU, EPI's cost, compile time
and memory of SmolLM2-135M and a 1.13B LLaMA, float32 master weights with bfloat16 compute.

    python benchmarks/gpu.py [--json runs/bench_gpu.json] [--repeats 10] [--budget-s 480]
    python benchmarks/gpu.py --allow-cpu --tiny     # the same code path on CPU, a tiny llama

Without an accelerator (JAX backend ``cpu``) it says so and exits 0, unless ``--allow-cpu
--tiny``. Everything is measured in this run, in this order:

1. the bfloat16 matmul peak: the best median FLOP/s of ``n`` x ``n`` matmuls (n = 8192, 16384);
2. per model (random weights, random tokens, scanned layers, ``remat: dots``): the EPI(AdamW)
   state alone (p = 1%, no refresh) with its step compiled twice, at H = 2**31 - 1 and at
   H = 1 (a refresh in every step, on the same state), one step of each, then the device's
   peak memory (``memory_stats()["peak_bytes_in_use"]``: the process's peak, so it is reported
   only where it rose in this phase; models run smallest first) beside the trainer's dry-run
   plan of the same config (``memory_plan``, EPI grad_sq float32) and XLA's own footprint of
   the compiled steps; then the AdamW state and step; then AdamW, EPI and the refresh step
   timed round-robin after a warm-up, median of ``--repeats`` (``interleaved_medians``).

MFU = (6 N tokens + 12 L H Dh T tokens) / step time / measured peak (PaLM, Chowdhery et al.
2022, App. B; ``train_step.step_flops``) with N the parameters that enter a matmul: an untied
input embedding is a gather and is left out. Refresh cost = (refresh step - EPI step) / AdamW
step. A phase starts only while at least as much of ``--budget-s`` is left (counted from the
start of the script) as the longest phase so far took (30 s before the first); what is skipped
is listed under the table and in the JSON.

Models: SmolLM2-135M (``ModelConfig.smollm2_135m()``, 134.5M parameters) at 16 x 1024 tokens;
LLaMA-1.1B, ``ModelConfig.llama3_8b()``'s blocks (width 4096, MLP 14336, 32 heads, 8 KV heads)
with 4 blocks and a 32,000-token vocabulary (LLaMA-2's), untied: 1,134,596,096 parameters,
1,003,524,096 in matmuls, at 8 x 1024 tokens.

Expected on one H100 (989 TFLOP/s dense bfloat16, ~40% MFU): 16.7 TFLOP per SmolLM2 step
(~0.04 s; narrow layers, so likely slower) and 51 TFLOP per 1.1B step (~0.13 s); about 35 steps
per model take well under a minute. Compilation dominates: 6 compiles of scanned steps, ~10-40 s
each, plus start-up: 2-5 minutes in all. An H200 (same peak, faster memory) should be similar.
"""

from __future__ import annotations

import os

# JAX reserves 75% of GPU memory by default; the 1.1B model's two train states need more room.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.90")

import argparse
import dataclasses
import functools
import gc
import json
import sys
import time

import jax
import jax.numpy as jnp
import optax
from flax import nnx

import epi_jax
from epi_jax.models import Decoder, ModelConfig
from epi_jax.train.config import Config, DataSection, ModelSection, OptimSection
from epi_jax.train.memory import GIB, memory_plan
from optimizer import interleaved_medians
from train_step import NEVER, TrainStep, matmul_peak, random_batch, step_flops

START = time.monotonic()
SWITCHES = dict(scan_layers=True, remat="dots", compute_dtype="bfloat16")


@dataclasses.dataclass(frozen=True)
class Bench:
  name: str
  config: ModelConfig
  batch: int
  seq: int


def benches(tiny: bool) -> list[Bench]:
  """The models to measure, smallest first (peak memory is reported where it rises)."""
  if tiny:
    return [Bench("tiny llama", ModelConfig.tiny("llama", **SWITCHES), 4, 64)]
  llama = ModelConfig.llama3_8b()
  return [
      Bench("SmolLM2-135M", dataclasses.replace(ModelConfig.smollm2_135m(), **SWITCHES), 16, 1024),
      Bench(
          "LLaMA-1.1B",
          dataclasses.replace(
              llama, num_layers=4, vocab_size=32_000, bos_token_id=1, eos_token_id=2, **SWITCHES
          ),
          8,
          1024,
      ),
  ]


class Deadline:
  """Starts a phase only while at least as much of the budget is left as the longest phase so
  far took; records what it skips."""

  def __init__(self, budget_s: float, first_s: float = 30.0):
    self.end, self.longest, self.skipped = START + budget_s, first_s, []

  def run(self, what: str, fn):
    left = self.end - time.monotonic()
    if left < self.longest:
      self.skipped.append(
          f"{what}: skipped, {left:.0f} s of the budget left, the longest phase took "
          f"{self.longest:.0f} s"
      )
      return None
    start = time.monotonic()
    out = fn()
    self.longest = max(self.longest, time.monotonic() - start)
    return out


def parameter_counts(config: ModelConfig) -> tuple[int, int]:
  """(all parameters, those entering a matmul: an untied input embedding is a gather)."""
  model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
  total = sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))
  gather = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
  return total, total - gather


def plan_gib(bench: Bench) -> float:
  """The dry run's per-device total with EPI (grad_sq, float32 S) for this model and batch."""
  c = bench.config
  config = Config(
      model=ModelSection(
          dtype="float32", compute_dtype=c.compute_dtype, scan_layers=c.scan_layers, remat=c.remat
      ),
      data=DataSection(seq_len=bench.seq),
      optim=OptimSection(batch_size=bench.batch),
  )
  return memory_plan(config, architecture=c)["methods"]["epi"]["grad_sq_float32"]["total_gib"]


def peak_bytes() -> int | None:
  stats = jax.devices()[0].memory_stats()
  return stats.get("peak_bytes_in_use") if stats else None


def xla_gib(step) -> float:
  """XLA's footprint of a compiled step: arguments + outputs - donated aliases + temporaries."""
  m = step.memory_analysis()
  size = m.argument_size_in_bytes + m.output_size_in_bytes - m.alias_size_in_bytes
  return (size + m.temp_size_in_bytes) / GIB


def epi_phase(bench: Bench, adamw, batch: dict) -> tuple[TrainStep, object, dict]:
  """The EPI state alone: its step without and with a refresh, one of each, and its memory."""
  before = peak_bytes()
  epi = TrainStep(bench.config, epi_jax.epi(adamw, p=0.01, interval=NEVER), batch)
  _, refresh, refresh_compile_s = epi.compile(epi_jax.epi(adamw, p=0.01, interval=1))
  epi()
  epi(refresh)
  after = peak_bytes()
  rose = after is not None and (before is None or after > before)
  return (
      epi,
      refresh,
      {
          "compile_epi_s": epi.compile_s,
          "compile_refresh_s": refresh_compile_s,
          "peak_gib": after / GIB if rose else None,
          "xla_epi_gib": xla_gib(epi.step),
          "xla_refresh_gib": xla_gib(refresh),
      },
  )


def measure(bench: Bench, peak: float, repeats: int, deadline: Deadline) -> dict:
  """One model's row: whatever the deadline lets through."""
  params, matmul = parameter_counts(bench.config)
  tokens = bench.batch * bench.seq
  flops = step_flops(bench.config, matmul, bench.batch, bench.seq)
  row = {
      "model": bench.name,
      "params": params,
      "matmul_params": matmul,
      "batch": bench.batch,
      "seq": bench.seq,
      "tokens_per_step": tokens,
      "flops_per_step": flops,
      "remat": bench.config.remat,
      "plan_gib": plan_gib(bench),
  }
  adamw = optax.adamw(1e-5, weight_decay=0.01)
  batch = random_batch(bench.config, bench.batch, bench.seq)
  phase = deadline.run(f"{bench.name} EPI steps", lambda: epi_phase(bench, adamw, batch))
  if phase is None:
    return row
  epi, refresh, memory = phase
  row |= memory
  if row["peak_gib"] is not None:
    row["peak_over_plan"] = row["peak_gib"] / row["plan_gib"]
  base = deadline.run(f"{bench.name} AdamW step", lambda: TrainStep(bench.config, adamw, batch))
  if base is None:
    return row
  row["compile_adamw_s"] = base.compile_s
  runs = {"adamw": base, "epi": epi, "refresh": functools.partial(epi, refresh)}
  t = deadline.run(f"{bench.name} timing", lambda: interleaved_medians(runs, repeats))
  if t is None:
    return row
  _, optimizer = nnx.merge(epi.graphdef, epi.state)
  return row | {
      "adamw_step_s": t["adamw"],
      "epi_step_s": t["epi"],
      "refresh_step_s": t["refresh"],
      "tokens_per_s": tokens / t["adamw"],
      "epi_tokens_per_s": tokens / t["epi"],
      "mfu_adamw": flops / t["adamw"] / peak,
      "mfu_epi": flops / t["epi"] / peak,
      "epi_over_adamw": t["epi"] / t["adamw"],
      "refresh_adamw_steps": (t["refresh"] - t["epi"]) / t["adamw"],
      "refreshes": int(epi_jax.mask_stats(optimizer.opt_state)["refreshes"]),
  }


def fmt(row: dict, key: str, spec: str, scale: float = 1.0) -> str:
  return "n/a" if row.get(key) is None else format(row[key] * scale, spec)


def table(rows: list[dict]) -> str:
  lines = [
      "| model | params | tokens/step | AdamW step ms | tokens/s | MFU | EPI / AdamW | refresh "
      "(AdamW steps) | compile AdamW s | compile EPI s | peak GiB | plan GiB | XLA EPI step GiB |",
      "|" + "---|" * 13,
  ]
  for r in rows:
    cells = [
        r["model"],
        f"{r['params'] / 1e6:,.2f}M",
        str(r["tokens_per_step"]),
        fmt(r, "adamw_step_s", ".1f", 1e3),
        fmt(r, "tokens_per_s", ",.0f"),
        fmt(r, "mfu_adamw", ".1%"),
        fmt(r, "epi_over_adamw", ".3f"),
        fmt(r, "refresh_adamw_steps", ".2f"),
        fmt(r, "compile_adamw_s", ".1f"),
        fmt(r, "compile_epi_s", ".1f"),
        fmt(r, "peak_gib", ".3g"),
        f"{r['plan_gib']:.3g}",
        fmt(r, "xla_epi_gib", ".3g"),
    ]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--json", default="runs/bench_gpu.json", help="also write the results here")
  parser.add_argument("--repeats", type=int, default=10, help="timed steps per variant")
  parser.add_argument("--budget-s", type=float, default=480.0, help="wall-clock budget")
  parser.add_argument("--allow-cpu", action="store_true", help="run on the CPU backend too")
  parser.add_argument("--tiny", action="store_true", help="a tiny llama instead of the models")
  return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
  args = parse(argv)
  backend = jax.default_backend()
  if backend == "cpu" and not args.allow_cpu:
    print("no accelerator found (JAX backend: cpu): nothing measured (--allow-cpu --tiny: CPU)")
    return 0
  if backend == "cpu" and not args.tiny:
    print(
        "error: --allow-cpu runs only with --tiny: the full models need an accelerator",
        file=sys.stderr,
    )
    return 2
  device = jax.devices()[0]
  sizes = (256,) if args.tiny else (8192, 16384)
  peak = max(matmul_peak(args.repeats, n, jnp.bfloat16) for n in sizes)
  print(
      f"jax {jax.__version__}, {jax.device_count()} x {device.device_kind} ({backend}); "
      f"bfloat16 matmul peak {peak / 1e12:.3g} TFLOP/s (best of n = {sizes}); float32 master "
      f"weights, bfloat16 compute; median of {args.repeats} after warm-up",
      flush=True,
  )
  deadline = Deadline(args.budget_s)
  rows = []
  for bench in benches(args.tiny):
    try:
      rows.append(measure(bench, peak, args.repeats, deadline))
    except Exception as error:  # e.g. out of memory: keep the other models' rows
      rows.append({"model": bench.name, "error": f"{type(error).__name__}: {error}"[:500]})
    gc.collect()
  measured = [r for r in rows if "error" not in r]
  print(table(measured))
  for line in deadline.skipped + [f"{r['model']}: {r['error']}" for r in rows if "error" in r]:
    print(f"- {line}")
  result = {
      "jax": jax.__version__,
      "backend": backend,
      "device": device.device_kind,
      "device_count": jax.device_count(),
      "bf16_peak_flops": peak,
      "matmul_sizes": list(sizes),
      "repeats": args.repeats,
      "budget_s": args.budget_s,
      "elapsed_s": time.monotonic() - START,
      "skipped": deadline.skipped,
      "rows": rows,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w") as f:
    json.dump(result, f, indent=1)
  print(f"{result['elapsed_s']:.0f} s in all; results in {args.json}")
  return 1 if len(measured) < len(rows) else 0


if __name__ == "__main__":
  sys.exit(main())
