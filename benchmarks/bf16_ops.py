"""Which ops of a SmolLM2 step does bfloat16 speed up or slow down on this backend?

Each op at SmolLM2-135M's shapes (4 x 512 tokens: 2048 rows, width 576, MLP 1536, 9 query and
3 kv heads of 64, one 128-query causal block, a 512-token logit chunk over 49,152 ids), once in
float32 and once in bfloat16 (float32 accumulation where the model asks for it), jitted, timed
round-robin after a warm-up (median of ``--repeats``).

    python benchmarks/bf16_ops.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp

from optimizer import interleaved_medians

F32 = jnp.float32


def _rmsnorm(x, w):
  x32 = x.astype(F32)
  return (x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + 1e-5)).astype(x.dtype) * w


OPS = {  # name: (function, argument shapes)
    "matmul x @ W [2048,576] @ [576,1536]": (lambda x, w: x @ w, [(2048, 576), (576, 1536)]),
    "matmul grad W: x^T @ dy": (lambda x, dy: x.T @ dy, [(2048, 576), (2048, 1536)]),
    "matmul grad x: dy @ W^T": (lambda dy, w: dy @ w.T, [(2048, 1536), (576, 1536)]),
    "attention scores (batched, float32 out)": (
        lambda q, k: jnp.einsum("bkgth,bksh->bkgts", q, k, preferred_element_type=F32),
        [(4, 3, 3, 128, 64), (4, 3, 512, 64)],
    ),
    "attention values (batched)": (
        lambda p, v: jnp.einsum("bkgts,bksh->bkgth", p, v),
        [(4, 3, 3, 128, 512), (4, 3, 512, 64)],
    ),
    "logit chunk [512,576] @ [576,49152] (float32 out)": (
        lambda x, w: jnp.matmul(x, w, preferred_element_type=F32),
        [(512, 576), (576, 49152)],
    ),
    "elementwise silu(a) * b [2048,1536]": (lambda a, b: jax.nn.silu(a) * b, [(2048, 1536)] * 2),
    "RMSNorm [2048,576] (float32 statistics)": (_rmsnorm, [(2048, 576), (576,)]),
    "softmax in float32, cast back": (
        lambda s: jax.nn.softmax(s.astype(F32), -1).astype(s.dtype),
        [(4, 3, 3, 128, 512)],
    ),
}


def _timed(fn, args):
  fn = jax.jit(fn)

  def run():
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    return time.perf_counter() - start

  return run


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--repeats", type=int, default=7)
  args = parser.parse_args()
  runs = {}
  for name, (fn, shapes) in OPS.items():
    for dtype in (jnp.float32, jnp.bfloat16):
      keys = jax.random.split(jax.random.key(0), len(shapes))
      values = [jax.random.normal(k, s, F32).astype(dtype) for k, s in zip(keys, shapes)]
      runs[name, jnp.dtype(dtype).name] = _timed(fn, values)
  times = interleaved_medians(runs, args.repeats)
  print(f"{jax.devices()[0].device_kind}; median of {args.repeats} after warm-up")
  print("| op | float32 ms | bfloat16 ms | bfloat16 / float32 |")
  print("|---|---|---|---|")
  for name in OPS:
    f32, bf16 = times[name, "float32"], times[name, "bfloat16"]
    print(f"| {name} | {f32 * 1e3:.2f} | {bf16 * 1e3:.2f} | {bf16 / f32:.2f} |")


if __name__ == "__main__":
  main()
