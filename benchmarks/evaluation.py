"""Cost of one after-stage evaluation: every task of a config scored by its own metric.

Builds the config's model (its checkpoint, or the random initialization) and held-out
examples exactly as the trainer does, then times ``epi_jax.eval.evaluate`` twice: the first
pass includes compiling one generation program per prompt-length bucket (and the likelihood
programs), the second is what every later stage pays. No judge is asked (judge tasks report
the ROUGE-L proxy; a judge adds its own latency).

    python benchmarks/evaluation.py --config configs/demo.yaml [--set KEY=VALUE ...]
"""

from __future__ import annotations

import argparse
import json
import time

from epi_jax.eval import avg_norm_score, evaluate
from epi_jax.eval.generation import bucket
from epi_jax.train.loading import load_config
from epi_jax.train.model import build_model
from epi_jax.train.sharding import build_mesh
from epi_jax.train.tasks import load_tasks


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", required=True)
  parser.add_argument("--set", action="append", default=[], dest="overrides")
  args = parser.parse_args()
  config = load_config(args.config, args.overrides)
  task_data = load_tasks(config)
  model = build_model(config.model, seed=config.train.seed, mesh=build_mesh(config.mesh))
  encoder = task_data.encoder
  lengths = [
      len(encoder.encode_prompt(e.prompt)) for ex in task_data.evaluation.values() for e in ex
  ]
  print(
      f"{sum(map(len, task_data.evaluation.values()))} examples, prompt lengths "
      f"{min(lengths)}-{max(lengths)}, buckets {sorted({bucket(n) for n in lengths})}, "
      f"max_new_tokens {config.eval.max_new_tokens}, batch {config.eval.batch_size}"
  )
  for label in ("first (with compilation)", "second"):
    start = time.perf_counter()
    results = evaluate(
        model,
        encoder,
        task_data.evaluation,
        task_data.metrics,
        max_new_tokens=config.eval.max_new_tokens,
        batch_size=config.eval.batch_size,
    )
    print(f"{label}: {time.perf_counter() - start:.2f} s")
  print(json.dumps(results, indent=1))
  print("avg_norm_score", json.dumps(avg_norm_score(results, task_data.metrics)))


if __name__ == "__main__":
  main()
