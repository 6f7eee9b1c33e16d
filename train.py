"""Train a decoder on a task stream: python train.py --config FILE [--set KEY=VALUE ...]
[--run-dir DIR] [--resume] [--dry-run]. See docs/trainer.md."""

from epi_jax.train.cli import main

if __name__ == "__main__":
  raise SystemExit(main())
