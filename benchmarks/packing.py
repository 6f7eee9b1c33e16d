"""Row fill of packed batches on GSM8K, CodeAlpaca and LogiQA: greedy packing against the
best-fit planner of ``BatchIterator(pack=True)`` at several ``pack_window`` sizes.

    python benchmarks/packing.py [--data ../shared/data] [--batch 8] [--seq 512]
                                 [--windows 16 64 256 1024]

Each dataset's training file (gsm8k/train.jsonl, code_alpaca/code_alpaca_2k.jsonl,
logiqa/validation.jsonl, as ``make smollm2-epi`` trains on them) is tokenized with the
SmolLM2-135M-Instruct chat template (needs ``make smollm2``) and one epoch (seed 0) is laid
out: padded (one example per row); greedy (the layout before best-fit packing: rows filled in
order, a row closed at the first example that does not fit); and best fit over each window.
Fill = real tokens / (batch x seq) over the epoch's batches; ms = iterator time per batch
(planning and layout, interleaved, indicative only).
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

import epi_jax.data as data
from epi_jax.models import load_tokenizer

FILES = {
    "gsm8k": "gsm8k/train.jsonl",
    "code_alpaca": "code_alpaca/code_alpaca_2k.jsonl",
    "logiqa": "logiqa/validation.jsonl",
}


def greedy_tokens_per_batch(lengths: np.ndarray, batch: int, seq: int) -> float:
  """Real tokens per batch of in-order greedy packing over epoch 0's order (seed 0)."""
  rows, used = [], seq
  for n in np.minimum(lengths[np.random.default_rng([0, 0]).permutation(len(lengths))], seq):
    if used + n > seq:
      rows.append(0)
      used = 0
    rows[-1] += n
    used += n
  full = len(rows) // batch * batch
  return float(np.sum(rows[:full])) / (full // batch)


def epoch_of_batches(examples, batch: int, seq: int, **settings) -> tuple[float, float]:
  """(Real tokens per batch, ms per batch) over the batches of ``BatchIterator``'s epoch 0."""
  it = data.BatchIterator(examples, batch_size=batch, seq_len=seq, pad_id=0, seed=0, **settings)
  real, start = [], time.perf_counter()
  while it.state.epoch == 0:
    real.append(next(it)["attention_mask"].sum())
  return float(np.mean(real)), 1e3 * (time.perf_counter() - start) / len(real)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument(
      "--data", default=os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data")
  )
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--seq", type=int, default=512)
  parser.add_argument("--windows", type=int, nargs="+", default=[16, 64, 256, 1024])
  args = parser.parse_args()
  encoder = data.ChatTemplateEncoder(load_tokenizer("smollm2-135m-instruct"))
  cells = args.batch * args.seq
  print(f"SmolLM2 chat template, batch {args.batch} x seq {args.seq}; tokens per batch (fill)")
  print(
      "| dataset | examples | padded | greedy | "
      + " | ".join(f"best fit W={w}" for w in args.windows)
      + " | ms/batch padded, "
      + ", ".join(f"W={w}" for w in args.windows)
      + " |"
  )
  print("|---" * (5 + len(args.windows)) + "|")
  for name, file in FILES.items():
    examples = data.encode_chats(data.load_chats(name, os.path.join(args.data, file)), encoder)
    lengths = np.array([len(e.input_ids) for e in examples])
    padded, padded_ms = epoch_of_batches(examples, args.batch, args.seq)
    greedy = greedy_tokens_per_batch(lengths, args.batch, args.seq)
    fits = [
        epoch_of_batches(examples, args.batch, args.seq, pack=True, pack_window=w)
        for w in args.windows
    ]
    cell = lambda tokens: f"{tokens:,.0f} ({tokens / cells:.1%})"
    print(
        f"| {name} | {len(examples):,} | {cell(padded)} | {cell(greedy)} | "
        + " | ".join(cell(tokens) for tokens, _ in fits)
        + f" | {padded_ms:.1f}, "
        + ", ".join(f"{ms:.1f}" for _, ms in fits)
        + " |",
        flush=True,
    )


if __name__ == "__main__":
  main()
