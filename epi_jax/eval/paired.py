"""Paired comparison of two methods on the same seeds and held-out examples: the mean difference
and its hierarchical bootstrap confidence interval, and the verdict the interval alone gives.

Scores are arrays [seeds, examples]: a[s, i] and b[s, i] are methods A and B on example i of
seed s (same seed, same example). The statistic is the mean over seeds of each seed's mean
difference d[s, :] = a[s, :] - b[s, :] (the grand mean, since every seed has as many examples).

The bootstrap is hierarchical (two stages), as the runs vary in two ways: resample the seeds
with replacement, then, inside each drawn seed, its examples with replacement; each resample's
statistic is the mean over its drawn seeds of their resampled example means. The interval is
the percentile interval of ``resamples`` such statistics. Draws come from
``numpy.random.default_rng(seed)``: resample r takes S * (1 + N) uniform doubles, for each of
its S slots one that picks the seed (floor(u * S)) and N that pick the examples
(floor(u * N)), so the draws do not depend on how resamples are batched.

References:
  Agarwal et al., Deep Reinforcement Learning at the Edge of the Statistical Precipice,
  NeurIPS 2021 (stratified bootstrap intervals over runs), https://arxiv.org/abs/2108.13264.
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import numpy as np

Verdict = Literal["less", "more", "cannot tell"]
CHUNK_VALUES = 4_000_000
"""Example indices drawn at once (bounds memory: 8 bytes each, twice)."""


class PairedDifference(NamedTuple):
  """A - B on paired scores: the mean, its interval and what the interval says."""

  mean: float  # mean over seeds of the per-seed mean of a - b
  low: float  # lower end of the confidence interval
  high: float  # upper end
  verdict: Verdict  # "less": A < B (high < 0); "more": A > B (low > 0); else "cannot tell"
  seeds: int
  examples: int  # per seed
  confidence: float
  resamples: int

  def as_dict(self) -> dict:
    return self._asdict()


def verdict(low: float, high: float) -> Verdict:
  """ "less" when the whole interval is below 0, "more" when above, else "cannot tell"."""
  if high < 0:
    return "less"
  if low > 0:
    return "more"
  return "cannot tell"


def _as_scores(x, name: str) -> np.ndarray:
  x = np.asarray(x, np.float64)
  if x.ndim == 1:
    x = x[None]
  if x.ndim != 2 or x.size == 0:
    raise ValueError(f"{name}: expected scores [seeds, examples], got shape {np.shape(x)}")
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name}: holds non-finite scores")
  return x


def bootstrap_means(diff: np.ndarray, *, resamples: int, seed: int) -> np.ndarray:
  """The ``resamples`` hierarchical bootstrap statistics of ``diff`` [S, N] (module docstring)."""
  seeds, examples = diff.shape
  rng = np.random.default_rng(seed)
  out = np.empty(resamples)
  chunk = max(1, CHUNK_VALUES // (seeds * (1 + examples)))
  for start in range(0, resamples, chunk):
    u = rng.random((min(chunk, resamples - start), seeds, 1 + examples))
    picked = np.minimum((u[..., 0] * seeds).astype(np.int64), seeds - 1)  # (R, S)
    index = np.minimum((u[..., 1:] * examples).astype(np.int64), examples - 1)  # (R, S, N)
    out[start : start + len(u)] = diff[picked[..., None], index].mean(axis=(1, 2))
  return out


def paired_difference(
    a,
    b,
    *,
    confidence: float = 0.95,
    resamples: int = 10_000,
    seed: int = 0,
) -> PairedDifference:
  """Mean of A - B over paired scores with its hierarchical bootstrap interval and verdict.

  Args:
    a: method A's scores [seeds, examples] (a 1-D array is one seed), e.g. per-example NLL.
    b: method B's scores, the same shape: the same seeds and examples in the same order.
    confidence: coverage of the percentile interval, in (0, 1).
    resamples: bootstrap resamples (seeds, then examples within each, with replacement).
    seed: seed of the bootstrap's ``numpy.random.default_rng`` (fixed: reruns agree).

  Returns:
    ``PairedDifference``; its verdict comes from the interval alone (0 inside: "cannot tell").
    With one seed the interval covers the example-to-example spread only, not the seed's.

  >>> paired_difference([[1.0, 2.0, 3.0]], [[0.0, 0.5, 1.0]]).mean
  1.5
  """
  a, b = _as_scores(a, "a"), _as_scores(b, "b")
  if a.shape != b.shape:
    raise ValueError(f"a and b must be paired: shapes {a.shape} and {b.shape} differ")
  if not 0 < confidence < 1:
    raise ValueError(f"confidence={confidence!r} must be in (0, 1)")
  if resamples < 1:
    raise ValueError(f"resamples={resamples!r} must be >= 1")
  diff = a - b
  stats = bootstrap_means(diff, resamples=resamples, seed=seed)
  tail = (1 - confidence) / 2
  low, high = (float(q) for q in np.quantile(stats, [tail, 1 - tail]))
  return PairedDifference(
      mean=float(diff.mean(axis=1).mean()),
      low=low,
      high=high,
      verdict=verdict(low, high),
      seeds=diff.shape[0],
      examples=diff.shape[1],
      confidence=confidence,
      resamples=resamples,
  )
