"""Does the trainer's malloc configuration (``epi_jax.train.host_memory``) slow the step?

Child processes each build the SmolLM2-135M train step of ``configs/smollm2/epi.yaml`` (random
weights, scanned, ``remat: dots``, EPI(AdamW) at H = 8, float32, 4 x 512 tokens) and time
``--steps`` steps after a compile and a warm-up step (the 8th step refreshes the mask, so
``--steps 7`` or more includes a refresh). The children alternate between glibc's defaults and
``configure_malloc()`` (called first, as the CLI does), ``--rounds`` of each; the table gives
each setting's median step time over all its steps, their ratio and each child's peak resident
memory.

    python benchmarks/host_memory.py [--rounds 2] [--steps 4]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

CHILD = """
import json, resource, sys
from epi_jax.train.host_memory import configure_malloc
if {configured}:
  configure_malloc()
sys.path.insert(0, {bench!r})
import dataclasses, optax, epi_jax
from epi_jax.models import ModelConfig
from train_step import TrainStep, random_batch
config = dataclasses.replace(ModelConfig.smollm2_135m(), scan_layers=True, remat="dots")
tx = epi_jax.epi(optax.adamw(5e-5, weight_decay=0.01), p=0.01, beta=0.99, interval=8)
step = TrainStep(config, tx, random_batch(config, 4, 512))
step()  # warm-up
times = [step() for _ in range({steps})]
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
print(json.dumps({{"times": times, "peak_gib": peak}}))
"""


def child(configured: bool, steps: int) -> dict:
  code = CHILD.format(configured=configured, bench=sys.path[0], steps=steps)
  out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
  return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--steps", type=int, default=4)
  args = parser.parse_args()
  runs = {False: [], True: []}
  for _ in range(args.rounds):
    for configured in (False, True):
      runs[configured].append(child(configured, args.steps))
  median = {c: statistics.median(t for r in rs for t in r["times"]) for c, rs in runs.items()}
  print(f"SmolLM2-135M EPI train step, 4 x 512, {args.rounds} rounds x {args.steps} steps")
  print("| malloc | median step s | / defaults | peak resident GiB per child |")
  print("|---|---|---|---|")
  for configured, name in ((False, "glibc defaults"), (True, "configure_malloc()")):
    peaks = ", ".join(f"{r['peak_gib']:.2f}" for r in runs[configured])
    print(
        f"| {name} | {median[configured]:.2f} | {median[configured] / median[False]:.3f} | {peaks} |"
    )


if __name__ == "__main__":
  main()
