"""Train steps of the `cpu` replication preset's tiny llama: how the step time grows with the
tokens per row and with the model's shape (why the preset is 2 blocks x 64 wide, 8 heads, at 48
tokens).

Every variant is one jitted, donated train step (forward, backward, AdamW) at batch 32 on
random tokens, timed as ``--steps`` consecutive steps, round-robin after a warm-up (compile
excluded), median of ``--repeats``; ratios are against the preset's shape at 48 tokens
measured in the same run.

    python benchmarks/tiny_step.py [--repeats 5] [--steps 10]
"""

from __future__ import annotations

import argparse
import os

import optax

from epi_jax.train.loading import load_config
from epi_jax.train.model import model_config
from optimizer import interleaved_medians
from train_step import TrainStep, random_batch

BATCH = 32
CPU_PRESET = os.path.join(os.path.dirname(__file__), "..", "configs", "replicate", "cpu.yaml")


def _model(*overrides: str):
  """The trainer's ModelConfig of the cpu preset with ``overrides`` (head size = width / heads)."""
  return model_config(load_config(CPU_PRESET, [f"model.{o}" for o in overrides]).model)


VARIANTS = {  # name -> (model config, tokens per row)
    **{f"preset, {t} tokens": (_model(), t) for t in (48, 56, 64, 80, 96)},
    "4 heads, 48 tokens": (_model("num_heads=4"), 48),
    "width 96 (6 heads), 48 tokens": (
        _model("hidden_size=96", "intermediate_size=192", "num_heads=6"),
        48,
    ),
    "width 128 (8 heads), 48 tokens": (
        _model("hidden_size=128", "intermediate_size=256", "num_heads=8"),
        48,
    ),
    "MLP 256, 48 tokens": (_model("intermediate_size=256"), 48),
    "3 blocks, 48 tokens": (_model("num_layers=3"), 48),
}


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--repeats", type=int, default=5)
  parser.add_argument("--steps", type=int, default=10)
  args = parser.parse_args()

  def timed(step: TrainStep):
    return lambda: sum(step() for _ in range(args.steps)) / args.steps

  runs = {
      name: timed(TrainStep(config, optax.adamw(1e-3), random_batch(config, BATCH, seq)))
      for name, (config, seq) in VARIANTS.items()
  }
  medians = interleaved_medians(runs, args.repeats)
  base = medians["preset, 48 tokens"]
  print(f"| variant (batch {BATCH}) | ms per step | / preset at 48 tokens |")
  print("| --- | --- | --- |")
  for name, seconds in medians.items():
    print(f"| {name} | {seconds * 1e3:.1f} | {seconds / base:.2f} |")


if __name__ == "__main__":
  main()
