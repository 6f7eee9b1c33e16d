"""The trainer's command line: ``python train.py`` or ``python -m epi_jax.train``, with
--config FILE [--set KEY=VALUE ...] [--run-dir DIR] [--resume] [--dry-run]. See docs/trainer.md.

Exit codes: 0 done; 2 bad input (one ``error:`` line on stderr, nothing trained or removed);
3 the training diverged (``train.on_divergence: stop``); 1 anything else (a traceback).
"""

import argparse
import sys

from epi_jax.errors import input_errors_exit


@input_errors_exit
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="train.py", description="Train a decoder on a task stream (docs/trainer.md)."
  )
  parser.add_argument("--config", required=True, help="YAML config file")
  parser.add_argument(
      "--set",
      action="append",
      default=[],
      metavar="KEY=VALUE",
      help="dotted override, e.g. --set method.p=0.02 (repeatable)",
  )
  parser.add_argument("--run-dir", help="output directory (default: run_dir of the config)")
  parser.add_argument(
      "--resume",
      action="store_true",
      help="continue from the latest complete checkpoint of the run directory",
  )
  parser.add_argument(
      "--dry-run",
      action="store_true",
      help="check the config, print the parameter count and memory plan, exit",
  )
  args = parser.parse_args(argv)
  from epi_jax.train.host_memory import configure_malloc

  configure_malloc()  # before JAX's and the data loaders' threads start
  from epi_jax.train.loading import load_config

  config = load_config(args.config, args.set)
  if args.dry_run:
    from epi_jax.train.memory import format_plan, memory_plan

    print(format_plan(memory_plan(config), config))
    return 0
  from epi_jax.train.distributed import initialize_from_env

  initialize_from_env()
  from epi_jax.train.divergence import EXIT_DIVERGED, TrainingDiverged
  from epi_jax.train.loop import train

  try:
    train(config, run_dir=args.run_dir, resume=args.resume)
  except TrainingDiverged as error:
    print(f"error: {error}", file=sys.stderr)
    return EXIT_DIVERGED
  return 0
