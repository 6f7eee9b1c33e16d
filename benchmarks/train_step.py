"""Whole training steps on SmolLM2-135M: model FLOP utilization, EPI vs AdamW, compile times,
and useful tokens per second of packed vs padded rows.

Everything is measured in one run: the float32 matmul peak (2048 x 2048), then for the
unscanned and the scanned decoder one jitted train step (forward, backward, optimizer; state
donated, as the trainer runs it) with AdamW and with EPI(AdamW) (no refresh in the timed steps;
the refresh is amortized over H and measured in benchmarks/optimizer.py). Steps are timed
round-robin after a warm-up (compile excluded), median of ``--repeats``.

    python benchmarks/train_step.py [--batch 8] [--seq 512] [--repeats 3] [--gsm8k FILE]
                                    [--causal-block N]

``--causal-block 0`` times attention over all keys (then masked) instead of per causal block.

MFU = (6 * N * tokens + 12 * L * H * Dh * T * tokens) / step time / measured peak, the
PaLM paper's count (Chowdhery et al. 2022, App. B) with N all parameters (tied embeddings
counted once). Packed vs padded: the GSM8K train file tokenized with the SmolLM2 chat template
(``--gsm8k``, default ../shared/data/gsm8k/train.jsonl; needs ``make smollm2``), one epoch laid
out both ways; both layouts have the same [batch, seq] shape, so each costs the measured step
time per batch and useful tokens/s = response+prompt tokens per batch / step time.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import epi_jax
import epi_jax.data as data
from epi_jax.models import Decoder, ModelConfig, layers
from epi_jax.train.step import make_optimizer, make_train_step
from optimizer import interleaved_medians

NEVER = 2**31 - 1


def matmul_peak(repeats: int, n: int = 2048, dtype=jnp.float32) -> float:
  """Measured FLOP/s of an ``n`` x ``n`` matmul in ``dtype``: the median of ``repeats`` (at
  least 5) calls after one warm-up."""
  a = jax.random.normal(jax.random.key(0), (n, n), dtype)
  f = jax.jit(lambda x, y: x @ y)
  jax.block_until_ready(f(a, a))
  times = []
  for _ in range(max(repeats, 5)):
    start = time.perf_counter()
    jax.block_until_ready(f(a, a))
    times.append(time.perf_counter() - start)
  return 2 * n**3 / statistics.median(times)


def step_flops(config: ModelConfig, params: int, batch: int, seq: int) -> float:
  tokens = batch * seq
  return (
      6 * params * tokens
      + 12 * config.num_layers * config.num_heads * config.head_dim * seq * tokens
  )


def model_and_optimizer(
    config: ModelConfig, tx, dtype=jnp.float32
) -> tuple[Decoder, nnx.Optimizer]:
  """A fresh model (seed 0) with ``dtype`` parameters and ``make_optimizer`` of ``tx`` on it."""
  model = Decoder(config, dtype=dtype, rngs=nnx.Rngs(0))
  return model, make_optimizer(model, tx)


class TrainStep:
  """One jitted, donated train step of a fresh model; records its compile time.

  The state is initialized inside ``jit``: its buffers are the step's own, with no eager copy.
  """

  def __init__(self, config: ModelConfig, tx, batch: dict, dtype=jnp.float32):
    self.config, self.batch, self.dtype = config, batch, dtype
    self.state = jax.jit(lambda: nnx.split(model_and_optimizer(config, tx, dtype))[1])()
    self.graphdef, self.step, self.compile_s = self.compile(tx)

  def compile(self, tx):
    """(graphdef, step, compile seconds) of the train step with ``tx`` in place of the
    optimizer's own (an optimizer state of the same structure, e.g. EPI at another interval)."""
    graphdef, _ = nnx.split(
        nnx.eval_shape(lambda: model_and_optimizer(self.config, tx, self.dtype))
    )
    start = time.perf_counter()
    step = make_train_step(graphdef, 1).lower(self.state, self.batch).compile()
    return graphdef, step, time.perf_counter() - start

  def __call__(self, step=None) -> float:
    """Seconds of one step (``step``, else this one's own) on the state."""
    start = time.perf_counter()
    self.state, out = (step or self.step)(self.state, self.batch)
    jax.block_until_ready((self.state, out))
    return time.perf_counter() - start


def random_batch(config: ModelConfig, batch: int, seq: int) -> dict:
  rng = np.random.default_rng(0)
  examples = [
      data.Encoded(rng.integers(3, config.vocab_size, seq).astype(np.int32), np.ones(seq, bool))
      for _ in range(batch)
  ]
  return {
      k: jnp.asarray(v)
      for k, v in data.make_batch([[e] for e in examples], seq_len=seq, pad_id=0).items()
  }


def useful_tokens_per_batch(path: str, batch: int, seq: int) -> dict[str, float]:
  """Mean real tokens per [batch, seq] batch over one epoch of GSM8K, padded and packed."""
  encoder = data.ChatTemplateEncoder(epi_jax.models.load_tokenizer("smollm2-135m-instruct"))
  examples = data.encode_chats(data.load_chats("gsm8k", path), encoder)
  out = {}
  for pack in (False, True):
    it = data.BatchIterator(
        examples, batch_size=batch, seq_len=seq, pad_id=encoder.pad_id, seed=0, pack=pack
    )
    real = []
    while it.state.epoch == 0:
      real.append(next(it)["attention_mask"].sum())
    out["packed" if pack else "padded"] = float(np.mean(real))
  return out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--repeats", type=int, default=3)
  parser.add_argument(
      "--gsm8k",
      default=os.path.join(
          os.path.dirname(__file__), "..", "..", "shared", "data", "gsm8k", "train.jsonl"
      ),
  )
  parser.add_argument(
      "--causal-block",
      type=int,
      default=layers.CAUSAL_BLOCK,
      help="queries per causal attention block; 0: one block of all queries",
  )
  args = parser.parse_args()
  layers.CAUSAL_BLOCK = args.causal_block or 2**31  # read when the steps are traced
  peak = matmul_peak(args.repeats)
  print(
      f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}; "
      f"float32 2048^2 matmul peak {peak / 1e9:.0f} GFLOP/s; SmolLM2-135M, float32, batch "
      f"{args.batch} x {args.seq}; causal block {args.causal_block or 'off'}; median of "
      f"{args.repeats} after warm-up"
  )
  base = ModelConfig.smollm2_135m()
  batch = random_batch(base, args.batch, args.seq)
  adamw = optax.adamw(1e-5, weight_decay=0.01)
  params = sum(
      x.size for x in jax.tree.leaves(nnx.state(Decoder(base, rngs=nnx.Rngs(0)), nnx.Param))
  )
  flops = step_flops(base, params, args.batch, args.seq)
  print(
      "| layers | AdamW step s | MFU | EPI / AdamW step | compile AdamW s | compile EPI s | "
      "compile EPI / AdamW |"
  )
  print("|---|---|---|---|---|---|---|")
  step_s = []
  for scan in (False, True):  # one layout at a time: four live train states exceed 24 GB
    config = dataclasses.replace(base, scan_layers=scan)
    runs = {
        "adamw": TrainStep(config, adamw, batch),
        "epi": TrainStep(config, epi_jax.epi(adamw, p=0.01, interval=NEVER), batch),
    }
    times = interleaved_medians(runs, args.repeats)
    a, e, t = runs["adamw"], runs["epi"], times["adamw"]
    print(
        f"| {'scanned' if scan else 'unscanned'} | {t:.2f} | {flops / t / peak:.1%} | "
        f"{times['epi'] / t:.3f} | {a.compile_s:.1f} | {e.compile_s:.1f} | "
        f"{e.compile_s / a.compile_s:.2f} |",
        flush=True,
    )
    step_s.append(t)
    del runs, a, e
  if os.path.exists(args.gsm8k):
    step_s = min(step_s)
    real = useful_tokens_per_batch(args.gsm8k, args.batch, args.seq)
    print(
        f"GSM8K train, {args.batch} x {args.seq}: real tokens per batch padded "
        f"{real['padded']:.0f}, packed {real['packed']:.0f}; useful tokens/s padded "
        f"{real['padded'] / step_s:.0f}, packed {real['packed'] / step_s:.0f} "
        f"(x{real['packed'] / real['padded']:.2f})"
    )
  else:
    print(f"no GSM8K file at {args.gsm8k}: packed vs padded skipped")


if __name__ == "__main__":
  main()
