"""Export a checkpoint of a training run as a Hugging Face folder and, with --gguf, a GGUF file:

  python -m epi_jax.export RUN_DIR [--step N | --stage K] [--out DIR] [--gguf] [--gguf-type f16|f32]

Without --step or --stage: the latest checkpoint. See docs/trainer.md, "Taking the model away".
Exit codes: 0 written; 2 bad input (one ``error:`` line on stderr).
"""

from __future__ import annotations

import argparse

from epi_jax.errors import input_errors_exit


@input_errors_exit
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m epi_jax.export",
      description="Export a run's checkpoint as a Hugging Face folder (and a GGUF file).",
  )
  parser.add_argument("run_dir", metavar="RUN_DIR", help="a run directory of train.py")
  which = parser.add_mutually_exclusive_group()
  which.add_argument("--step", type=int, help="the checkpoint of this optimizer step")
  which.add_argument(
      "--stage", type=int, help="the checkpoint saved at the end of stage K (from 0)"
  )
  parser.add_argument("--out", help="output folder (default: RUN_DIR/exports/step_<N>)")
  parser.add_argument("--gguf", action="store_true", help="also write OUT/model-<type>.gguf")
  parser.add_argument(
      "--gguf-type", choices=("f16", "f32"), default="f16", help="type of the GGUF matrices"
  )
  args = parser.parse_args(argv)

  from epi_jax.train.export import export_run

  out = export_run(
      args.run_dir,
      out=args.out,
      step=args.step,
      stage=args.stage,
      gguf_type=args.gguf_type if args.gguf else None,
  )
  print(out)
  return 0


if __name__ == "__main__":
  raise SystemExit(main())
