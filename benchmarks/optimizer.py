"""Optimizer overhead of EPI against a plain AdamW step, measured in the same run.

Prints, per model size, the median time of one jitted step (compile excluded) as a
ratio to the AdamW step: EPI without refresh (float32, bfloat16 and adam_nu
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
from epi_jax import selection


def decoder_params(size: float, key) -> dict:
  """A decoder-shaped pytree (blocks of 7 matrices plus embedding) of about ``size`` entries."""
  width = 256 if size <= 2e6 else 512 if size <= 2e7 else 1024
  per_block = 12 * width * width + 2 * width
  blocks = max(2, round(0.8 * size / per_block))
  vocab = max(1000, round((size - blocks * per_block) / width))
  shapes = {"embed": (vocab, width), "final_norm": (width,)}
  for i in range(blocks):
    for name, shape in {"q": (width, width), "k": (width, width), "v": (width, width),
                        "o": (width, width), "gate": (width, 8 * width // 3 * 1),
                        "up": (width, 8 * width // 3), "down": (8 * width // 3, width),
                        "norm1": (width,), "norm2": (width,)}.items():
      shapes[f"layers/{i}/{name}"] = shape
  keys = jax.random.split(key, len(shapes))
  return {n: jax.random.normal(k, s, jnp.float32) * 0.02 for (n, s), k in zip(shapes.items(), keys)}


def median_time(fn, args, repeats: int) -> float:
  """Median wall time of ``fn(*args)`` after one warm-up call (compile excluded)."""
  out = fn(*args)
  jax.block_until_ready(out)
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def step_time(tx, params, grads, repeats: int) -> float:
  state = tx.init(params)

  @jax.jit
  def step(p, s, g):
    updates, s = tx.update(g, s, p)
    return optax.apply_updates(p, updates), s

  return median_time(step, (params, state, grads), repeats)


def sort_refresh(scores, p: float):
  """The naive refresh: normalize, concatenate and sort everything, threshold, mask."""
  leaves, treedef = jax.tree.flatten(scores)
  groups = selection.layer_groups(scores)
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
  print(f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].platform}, "
        f"median of {args.repeats} after warm-up; ratios to one jitted AdamW step")
  header = ("params", "leaves", "AdamW ms", "EPI f32", "EPI bf16", "EPI adam_nu",
            "refresh", "sort refresh", "H=500 f32", "H=500 adam_nu")
  print("| " + " | ".join(header) + " |")
  print("|" + "---|" * len(header))
  adamw = optax.adamw(1e-5, weight_decay=0.01)
  for size in args.sizes:
    key = jax.random.PRNGKey(0)
    params = decoder_params(size, key)
    grads = jax.tree.map(lambda x: x * 0.1 + 1e-3, params)
    count = sum(x.size for x in jax.tree.leaves(params))
    base = step_time(adamw, params, grads, args.repeats)
    f32 = step_time(epi_jax.epi(adamw, interval=10**9), params, grads, args.repeats)
    bf16 = step_time(epi_jax.epi(adamw, interval=10**9, sensitivity_dtype=jnp.bfloat16),
                     params, grads, args.repeats)
    nu = step_time(epi_jax.epi(adamw, interval=10**9, sensitivity="adam_nu"),
                   params, grads, args.repeats)
    every = step_time(epi_jax.epi(adamw, interval=1), params, grads, args.repeats)
    scores = jax.tree.map(lambda g: g * g, grads)
    sort = median_time(jax.jit(lambda s: sort_refresh(s, 0.01)), (scores,), args.repeats)
    refresh = max(every - f32, 0.0)
    row = (f"{count / 1e6:.1f}M", str(len(params)), f"{base * 1e3:.1f}", f"{f32 / base:.2f}",
           f"{bf16 / base:.2f}", f"{nu / base:.2f}", f"{refresh / base:.2f}",
           f"{sort / base:.1f}", f"{(f32 + refresh / 500) / base:.3f}",
           f"{(nu + refresh / 500) / base:.3f}")
    print("| " + " | ".join(row) + " |", flush=True)


if __name__ == "__main__":
  main()
