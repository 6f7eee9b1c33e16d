"""Does a precision setting train like float32? SmolLM2-135M-Instruct on GSM8K, a few AdamW steps.

For each learning rate, the same packed GSM8K batches train the real model from the same start
under each precision (``--modes``):

- ``float32``: float32 parameters, float32 compute (the reference);
- ``mixed``: float32 master parameters, bfloat16 compute;
- ``bf16_sr``: bfloat16 parameters and compute, updates applied with stochastic rounding;
- ``bf16_rtn``: the same with round-to-nearest (``optax.apply_updates``): the old behaviour.

Per mode: the loss of every step, the late loss (mean over the second half of the steps) and
its ratio to float32's, the fraction of entries whose bfloat16 value changed, the projection of
the total displacement on float32's (1: the same expected step) and their cosine, and the
median step time after the first two steps (compile excluded; not interleaved: see
benchmarks/tiny_step.py-style ratios in docs/benchmarks.md for speed).

    python benchmarks/precision.py [--model smollm2|tiny] [--lr 1e-5 5e-5] [--steps 10]
                                   [--batch 4] [--seq 256] [--gsm8k FILE] [--json OUT]
    python benchmarks/precision.py --speed [--variants MODE:REMAT ...] [--batch 4] [--seq 512]

``smollm2`` needs ``make smollm2`` (the GGUF checkpoint) and the GSM8K train file in the hub
schema; ``tiny`` (a random 2-block llama on random tokens) needs nothing: the tests run it.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import statistics
import time

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
from flax import nnx

import epi_jax.data as data
from epi_jax.models import Decoder, ModelConfig, from_pretrained, load_tokenizer
from epi_jax.models.loss import mean_loss_and_grads
from epi_jax.train.step import make_optimizer, make_train_step
from optimizer import interleaved_medians
from train_step import TrainStep, random_batch

MODES = {  # name: (parameter dtype, compute dtype, stochastic rounding)
    "float32": ("float32", "float32", True),
    "mixed": ("float32", "bfloat16", True),
    "bf16_sr": ("bfloat16", "bfloat16", True),
    "bf16_rtn": ("bfloat16", "bfloat16", False),
}
CHECKPOINT = "smollm2-135m-instruct"


def gsm8k_batches(path: str, batch: int, seq: int, steps: int) -> list[dict]:
  """``steps`` packed batches of the GSM8K file in the SmolLM2 chat template."""
  encoder = data.ChatTemplateEncoder(load_tokenizer(CHECKPOINT))
  examples = data.encode_chats(data.load_chats("gsm8k", path), encoder)
  it = data.BatchIterator(
      examples, batch_size=batch, seq_len=seq, pad_id=encoder.pad_id, seed=0, pack=True
  )
  return [{k: jnp.asarray(v) for k, v in next(it).items()} for _ in range(steps)]


def random_batches(vocab: int, batch: int, seq: int, steps: int) -> list[dict]:
  """``steps`` batches of tokens drawn from the first 40 ids (a learnable unigram law)."""
  rng = np.random.default_rng(0)
  out = []
  for _ in range(steps):
    rows = [
        [data.Encoded(rng.integers(3, min(vocab, 40), seq).astype(np.int32), np.ones(seq, bool))]
        for _ in range(batch)
    ]
    out.append({k: jnp.asarray(v) for k, v in data.make_batch(rows, seq_len=seq, pad_id=0).items()})
  return out


def load_model(name: str, dtype: str, compute: str) -> nnx.Module:
  """SmolLM2-135M-Instruct, or ``tiny`` (a 2-block llama, random float32 init), with its
  parameters stored in ``dtype`` (rounded from the same float32 values) and computing in
  ``compute``."""
  if name == "smollm2":
    model, _ = from_pretrained(
        CHECKPOINT, dtype=jnp.dtype(dtype), compute_dtype=compute, scan_layers=True
    )
    return model
  config = ModelConfig.tiny("llama", compute_dtype=compute)
  model = Decoder(config, rngs=nnx.Rngs(0))
  nnx.update(model, jax.tree.map(lambda x: x.astype(dtype), nnx.state(model, nnx.Param)))
  return model


def nearest_rounding_step(graphdef):
  """The train step as ``nnx.Optimizer.update`` applies it: round-to-nearest into bfloat16."""

  def step(state, batch):
    model, optimizer = nnx.merge(graphdef, state)
    grads, loss, _ = mean_loss_and_grads(model, batch, 1)
    optimizer.update(model, jax.tree.map(lambda g: g.astype(jnp.bfloat16), grads))
    return nnx.state((model, optimizer)), {"loss": loss}

  return jax.jit(step, donate_argnums=0)


def train(model_name: str, mode: str, lr: float, batches: list[dict]) -> dict:
  """Losses, the flat float32 displacement of every parameter (exact: start and end are
  float32 or bfloat16 values a few ulps apart) and which entries' bfloat16 value changed."""
  dtype, compute, stochastic = MODES[mode]
  model = load_model(model_name, dtype, compute)
  flat = lambda: np.concatenate(
      [np.asarray(x, np.float32).ravel() for x in jax.tree.leaves(nnx.state(model, nnx.Param))]
  )
  start = flat()
  tx = optax.adamw(lr, weight_decay=0.01)
  optimizer = make_optimizer(model, tx) if stochastic else nnx.Optimizer(model, tx, wrt=nnx.Param)
  graphdef, state = nnx.split((model, optimizer))
  step = make_train_step(graphdef, 1) if stochastic else nearest_rounding_step(graphdef)
  losses, times = [], []
  for batch in batches:
    t0 = time.perf_counter()
    state, out = step(state, batch)
    losses.append(float(out["loss"]))
    times.append(time.perf_counter() - t0)
  model, _ = nnx.merge(graphdef, state)
  end = flat()
  bf16 = lambda x: x.astype(ml_dtypes.bfloat16)
  return {
      "losses": losses,
      "delta": end - start,
      "moved": bf16(start) != bf16(end),
      "step_s": statistics.median(times[2:]),
  }


def _dot(a: np.ndarray, b: np.ndarray, chunk: int = 1 << 20) -> float:
  """a . b accumulated in float64, a million entries at a time (no float64 copy of either)."""
  return sum(
      float(np.dot(a[i : i + chunk].astype(np.float64), b[i : i + chunk].astype(np.float64)))
      for i in range(0, a.size, chunk)
  )


def against(ref: dict, run: dict, late: slice) -> dict:
  """``run`` beside float32's ``ref``: late-loss ratio; the projection of its displacement on
  float32's (1: the same expected step) and their cosine; the fraction of entries whose
  bfloat16 value changed (float32 runs rounded to bfloat16 at start and end)."""
  d_ref, d = ref["delta"], run["delta"]
  ref_sq, sq, cross = _dot(d_ref, d_ref), _dot(d, d), _dot(d, d_ref)
  return {
      "late_loss": float(np.mean(run["losses"][late])),
      "late_loss_ratio": float(np.mean(run["losses"][late]) / np.mean(ref["losses"][late])),
      "projection": cross / ref_sq,
      "cosine": cross / float(np.sqrt(sq * ref_sq)),
      "moved": float(np.mean(run["moved"])),
  }


def study(model_name: str, lrs, modes, batches: list[dict]):
  """Yields one row per (lr, mode): ``against`` float32 at that lr, the losses, the step time."""
  late = slice(len(batches) // 2, None)
  for lr in lrs:
    ref = train(model_name, "float32", lr, batches)
    for mode in modes:
      run = ref if mode == "float32" else train(model_name, mode, lr, batches)
      row = {"lr": lr, "mode": mode, "losses": run["losses"], "step_s": run["step_s"]}
      yield row | against(ref, run, late)


def speed(batch: int, seq: int, repeats: int, variants) -> dict[tuple[str, str], float]:
  """Median seconds of one SmolLM2-135M train step (random weights, scanned, AdamW) per
  (precision, remat) of ``variants``, timed round-robin after a warm-up."""
  runs = {}
  for mode, remat in variants:
    dtype, compute, _ = MODES[mode]
    config = dataclasses.replace(
        ModelConfig.smollm2_135m(), scan_layers=True, remat=remat, compute_dtype=compute
    )
    tokens = random_batch(config, batch, seq)
    runs[mode, remat] = TrainStep(config, optax.adamw(1e-5), tokens, dtype=jnp.dtype(dtype))
  return interleaved_medians(runs, repeats)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--model", choices=["smollm2", "tiny"], default="smollm2")
  parser.add_argument("--lr", type=float, nargs="+", default=[1e-5, 5e-5])
  parser.add_argument("--steps", type=int, default=10)
  parser.add_argument("--batch", type=int, default=4)
  parser.add_argument("--seq", type=int, default=256)
  parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
  parser.add_argument(
      "--gsm8k",
      default=os.path.join(
          os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k", "train.jsonl"
      ),
  )
  parser.add_argument("--json", help="also write the results here")
  parser.add_argument("--speed", action="store_true", help="only time train steps of --variants")
  parser.add_argument(
      "--variants",
      nargs="+",
      default=["float32:none", "float32:dots", "mixed:dots"],
      help="MODE:REMAT pairs for --speed; the first is the baseline (each holds a train state)",
  )
  parser.add_argument("--repeats", type=int, default=5)
  args = parser.parse_args()
  if args.speed:
    variants = [tuple(v.split(":")) for v in args.variants]
    times = speed(args.batch, args.seq, args.repeats, variants)
    print(f"SmolLM2-135M train step, {args.batch} x {args.seq}, median of {args.repeats}")
    base = times[variants[0]]
    print(f"| mode | remat | step s | / {':'.join(variants[0])} |")
    print("|---|---|---|---|")
    for (mode, remat), seconds in times.items():
      print(f"| {mode} | {remat} | {seconds:.2f} | {seconds / base:.3f} |")
    return
  if args.model == "smollm2":
    batches = gsm8k_batches(args.gsm8k, args.batch, args.seq, args.steps)
  else:
    batches = random_batches(ModelConfig.tiny("llama").vocab_size, args.batch, args.seq, args.steps)
  print(
      f"{args.model}, AdamW, {args.batch} x {args.seq} tokens, {args.steps} steps; late loss = "
      f"mean of steps {args.steps // 2 + 1}-{args.steps}"
  )
  print(
      "| lr | mode | late loss | / float32 | bfloat16 entries moved | projection on float32's "
      "step | cosine | step s |"
  )
  print("|---|---|---|---|---|---|---|---|")
  results = []
  for row in study(args.model, args.lr, args.modes, batches):
    print(
        f"| {row['lr']:g} | {row['mode']} | {row['late_loss']:.4f} | "
        f"{row['late_loss_ratio']:.4f} | {row['moved']:.1%} | {row['projection']:.3f} | "
        f"{row['cosine']:.3f} | {row['step_s']:.2f} |",
        flush=True,
    )
    results.append(row)
  if args.json:
    with open(args.json, "w") as f:
      json.dump(results, f, indent=1)


if __name__ == "__main__":
  main()
