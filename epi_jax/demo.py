"""``python -m epi_jax.demo [--config FILE] [--out DIR]``: sequential SFT, EPI and static
isolation on the same embedded task stream, side by side, with a verdict and a report.

Each method is ``--set method.type=...`` on one config (``configs/demo.yaml``: the settings
are chosen from the ``cpu`` replication sweep, see README), trained by its own trainer process
into ``DIR/<method>``, two at a time (the machine's two cores).
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import sys

import numpy as np

from epi_jax.errors import input_errors_exit
from epi_jax.progress import ProgressBoard, run_trainer

METHODS = ("multistage", "epi", "static")
LABELS = {"multistage": "sequential SFT", "epi": "EPI", "static": "static isolation"}


def _scores(summary: dict) -> dict[str, float]:
  """Mean final accuracy, BWT and mean forgetting ratio of the earlier stages' tasks."""
  continual = summary["analyses"]["continual"]
  last = set(summary["stages"][-1])
  fr = [v for t, v in summary["forgetting_ratio"].items() if v is not None and t not in last]
  return {
      "final": float(np.mean(list(summary["final_accuracy"].values()))),
      "bwt": continual["bwt"],
      "fr": float(np.mean(fr)) if fr else float("nan"),
  }


def verdict(scores: dict[str, dict[str, float]]) -> str:
  """One line on EPI against sequential SFT (and static isolation), from the numbers."""
  epi, seq = scores["epi"], scores["multistage"]
  kept = "forgot less than" if epi["bwt"] > seq["bwt"] else "did not forget less than"
  line = (
      f"EPI {kept} sequential SFT (BWT {epi['bwt']:+.3f} vs {seq['bwt']:+.3f}, mean final "
      f"accuracy {epi['final']:.3f} vs {seq['final']:.3f})"
  )
  if "static" in scores:
    st = scores["static"]
    better = "above" if epi["final"] > st["final"] else "not above"
    line += (
        f"; its final accuracy is {better} static isolation's ({st['final']:.3f}, "
        f"BWT {st['bwt']:+.3f})"
    )
  return line + "."


def _print_results(summaries: dict[str, dict]) -> str:
  """Prints each run's accuracy matrix and the methods' scores; returns the verdict line."""
  from epi_jax.eval.forgetting import format_table

  print()
  for method, s in summaries.items():
    print(f"{LABELS[method]}  (wall time {s['wall_time_s']:.0f} s)")
    print(
        format_table(
            [r["accuracy"] for r in s["accuracy_matrix"]], s["stages"], s["forgetting_ratio"]
        )
    )
    print()
  scores = {m: _scores(s) for m, s in summaries.items()}
  print(f"{'method':<18}{'final acc':>10}{'BWT':>9}{'mean FR %':>11}")
  for method, sc in scores.items():
    print(f"{LABELS[method]:<18}{sc['final']:>10.3f}{sc['bwt']:>+9.3f}{sc['fr']:>11.1f}")
  line = verdict(scores)
  print(f"\nverdict: {line}")
  return line


@input_errors_exit
def main(argv: list[str] | None = None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m epi_jax.demo", description=__doc__.split("\n")[0]
  )
  parser.add_argument("--config", default="configs/demo.yaml")
  parser.add_argument("--out", default="runs/demo")
  parser.add_argument(
      "--methods",
      default=",".join(METHODS),
      help=f"comma-separated subset of {','.join(METHODS)} (multistage and epi "
      "are needed for the verdict; static is the third run)",
  )
  parser.add_argument("--jobs", type=int, default=2, help="trainer processes at once")
  parser.add_argument(
      "--set",
      action="append",
      default=[],
      metavar="KEY=VALUE",
      help="override of every run's config, e.g. train.steps_per_stage=20",
  )
  args = parser.parse_args(argv)
  methods = args.methods.split(",")
  if not {"multistage", "epi"} <= set(methods) <= set(METHODS):
    parser.error(f"--methods: need multistage and epi, among {', '.join(METHODS)}")

  from epi_jax.report import require_plotting, write_report
  from epi_jax.train.loading import ConfigError, load_config

  require_plotting()  # the demo ends with the report's plots
  for method in methods:  # every config is checked before any training
    config = load_config(args.config, [*args.set, f"method.type={method}"])
    if "continual" not in config.eval.analyses:
      raise ConfigError(f"{args.config}: eval.analyses must include continual (BWT)")

  def run(method: str) -> int:
    """One trainer process (the runs are independent: up to --jobs train at once)."""
    out = os.path.join(args.out, method)
    os.makedirs(out, exist_ok=True)
    sets = [
        x for o in [*args.set, f"method.type={method}", "log.progress=false"] for x in ("--set", o)
    ]
    log = os.path.join(args.out, f"{method}.log")
    code = run_trainer(
        [sys.executable, "-m", "epi_jax.train", "--config", args.config, "--run-dir", out, *sets],
        run_dir=out,
        log_path=log,
        cache_dir=os.path.join(args.out, "jax_cache"),
        board=board,
        label=LABELS[method],
        append=False,
    )
    board.message(f"{LABELS[method]}: {'done' if code == 0 else f'FAILED (see {log})'}")
    return code

  print(f"training {', '.join(LABELS[m] for m in methods)} ({args.jobs} at a time)", flush=True)
  with ProgressBoard() as board, concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
    codes = list(pool.map(run, methods))
  if any(codes):
    return 1
  summaries = {}
  for method in methods:
    with open(os.path.join(args.out, method, "summary.json")) as f:
      summaries[method] = json.load(f)

  line = _print_results(summaries)
  report = write_report(
      [os.path.join(args.out, m) for m in methods],
      os.path.join(args.out, "report"),
      labels={os.path.join(args.out, m): LABELS[m] for m in methods},
      title="EPI demo",
      extra_markdown=f"## Verdict\n\n{line}\n",
  )
  print(f"report: {report}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
