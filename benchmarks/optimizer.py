"""Optimizer overhead of EPI against a plain AdamW step, measured in the same run.

Prints, per model size, the median time of one jitted step with donated buffers
(compile excluded, all variants timed round-robin) as a ratio to the AdamW step: EPI without refresh (float32, bfloat16 and adam_nu
sensitivity), one refresh (EPI step with a refresh minus EPI step), and a sort-based
refresh (a full sort of the normalized scores) for comparison.

    python benchmarks/optimizer.py [--sizes 1e6 1e7 5e7] [--repeats 7]
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

import epi_jax
from epi_jax._src import selection


def decoder_params(size: float, key) -> dict:
  """A decoder-shaped pytree (blocks of 7 matrices plus embedding) of about ``size`` entries."""
  width = 128 if size <= 2e6 else 512 if size <= 2e7 else 1024
  per_block = 12 * width * width + 2 * width
  blocks = max(2, round(0.8 * size / per_block))
  vocab = max(1000, round((size - blocks * per_block) / width))
  shapes = {"embed": (vocab, width), "final_norm": (width,)}
  for i in range(blocks):
    for name, shape in {
        "q": (width, width),
        "k": (width, width),
        "v": (width, width),
        "o": (width, width),
        "gate": (width, 8 * width // 3),
        "up": (width, 8 * width // 3),
        "down": (8 * width // 3, width),
        "norm1": (width,),
        "norm2": (width,),
    }.items():
      shapes[f"layers/{i}/{name}"] = shape
  keys = jax.random.split(key, len(shapes))
  return {n: jax.random.normal(k, s, jnp.float32) * 0.02 for (n, s), k in zip(shapes.items(), keys)}


class Stepper:
  """One jitted optimizer step with donated params and state, as a training loop runs it."""

  def __init__(self, tx, params, grads):
    self.grads = grads
    self.params = jax.tree.map(jnp.copy, params)
    self.state = jax.jit(tx.init)(self.params)

    def step(p, s, g):
      updates, s = tx.update(g, s, p)
      return optax.apply_updates(p, updates), s

    self.step = jax.jit(step, donate_argnums=(0, 1))

  def __call__(self) -> float:
    start = time.perf_counter()
    self.params, self.state = self.step(self.params, self.state, self.grads)
    jax.block_until_ready((self.params, self.state))
    return time.perf_counter() - start


class Call:
  """A jitted function of fixed arguments, timed like a ``Stepper``."""

  def __init__(self, fn, *args):
    self.fn, self.args = jax.jit(fn), args

  def __call__(self) -> float:
    start = time.perf_counter()
    jax.block_until_ready(self.fn(*self.args))
    return time.perf_counter() - start


def interleaved_medians(runs: dict, repeats: int) -> dict:
  """Median time of each run, timed round-robin after a warm-up call (compile excluded).

  Interleaving keeps slow drifts of the machine's load out of the ratios.
  """
  for run in runs.values():
    run()
  times = {name: [] for name in runs}
  for _ in range(repeats):
    for name, run in runs.items():
      times[name].append(run())
  return {name: statistics.median(t) for name, t in times.items()}


def sort_refresh(scores, p: float):
  """The naive refresh: normalize, concatenate and sort everything, threshold, mask."""
  leaves, treedef = jax.tree.flatten(scores)
  groups = epi_jax.layer_groups(scores)
  normed = selection.normalized_scores(leaves, groups, "layer_minmax")
  flat = jnp.sort(jnp.concatenate([x.reshape(-1) for x in normed]))
  k = selection.num_protected(p, flat.size)
  tau = flat[flat.size - k]
  return jax.tree.unflatten(treedef, [(x >= tau) & (x > 0) for x in normed])


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", type=float, nargs="+", default=[1e6, 1e7, 5e7])
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  print(
      f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}, "
      f"median of {args.repeats} after warm-up; ratios to one jitted AdamW step"
  )
  header = (
      "params",
      "leaves",
      "AdamW ms",
      "EPI f32",
      "EPI bf16",
      "EPI adam_nu",
      "refresh",
      "sort refresh",
      "H=500 f32",
      "H=500 adam_nu",
  )
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  adamw = optax.adamw(1e-5, weight_decay=0.01)
  never = 2**31 - 1
  for size in args.sizes:
    params = decoder_params(size, jax.random.PRNGKey(0))
    grads = jax.tree.map(lambda x: x * 0.1 + 1e-3, params)
    count = sum(x.size for x in jax.tree.leaves(params))
    runs = {
        "adamw": Stepper(adamw, params, grads),
        "f32": Stepper(epi_jax.epi(adamw, interval=never), params, grads),
        "bf16": Stepper(
            epi_jax.epi(adamw, interval=never, sensitivity_dtype=jnp.bfloat16), params, grads
        ),
        "nu": Stepper(epi_jax.epi(adamw, interval=never, sensitivity="adam_nu"), params, grads),
        "every": Stepper(epi_jax.epi(adamw, interval=1), params, grads),
        "sort": Call(lambda s: sort_refresh(s, 0.01), jax.tree.map(lambda g: g * g, grads)),
    }
    t = interleaved_medians(runs, args.repeats)
    del runs
    base, f32, bf16, nu, every, sort = (
        t[k] for k in ("adamw", "f32", "bf16", "nu", "every", "sort")
    )
    refresh = max(every - f32, 0.0)
    row = (
        f"{count / 1e6:.1f}M",
        str(len(params)),
        f"{base * 1e3:.1f}",
        f"{f32 / base:.2f}",
        f"{bf16 / base:.2f}",
        f"{nu / base:.2f}",
        f"{refresh / base:.2f}",
        f"{sort / base:.1f}",
        f"{(f32 + refresh / 500) / base:.3f}",
        f"{(nu + refresh / 500) / base:.3f}",
    )
    print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
  main()
