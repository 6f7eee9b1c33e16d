"""Paired bootstrap: the resampled statistics against a literal float64 loop with the same
draws, their spread against the hierarchical bootstrap's exact variance, and verdicts on
synthetic scores whose true difference is known."""

import numpy as np
import pytest

from epi_jax.eval import paired
from epi_jax.eval.paired import bootstrap_means, paired_difference, verdict


def _scores(rng, seeds, examples, *, delta, seed_sd=0.3, example_sd=1.0):
  """(a, b) with a - b = delta + a per-seed offset + per-example noise."""
  b = rng.normal(2.0, 1.0, (seeds, examples))
  offsets = rng.normal(0.0, seed_sd, (seeds, 1))
  return b + delta + offsets + rng.normal(0.0, example_sd, (seeds, examples)), b


def _reference_means(diff, resamples, seed):
  """One resample at a time, as the module docstring states the draws."""
  seeds, examples = diff.shape
  rng = np.random.default_rng(seed)
  out = []
  for _ in range(resamples):
    u = rng.random((seeds, 1 + examples))
    slot_means = []
    for j in range(seeds):
      s = int(np.floor(u[j, 0] * seeds))
      picks = np.floor(u[j, 1:] * examples).astype(int)
      slot_means.append(np.mean([diff[s, i] for i in picks]))
    out.append(np.mean(slot_means))
  return np.asarray(out)


def test_bootstrap_equals_a_literal_loop_and_does_not_depend_on_batching(monkeypatch):
  rng = np.random.default_rng(0)
  a, b = _scores(rng, 3, 7, delta=0.2)
  want = _reference_means(a - b, 300, seed=5)
  np.testing.assert_allclose(bootstrap_means(a - b, resamples=300, seed=5), want, rtol=1e-12)
  monkeypatch.setattr(paired, "CHUNK_VALUES", 50)  # two resamples per batch
  np.testing.assert_allclose(bootstrap_means(a - b, resamples=300, seed=5), want, rtol=1e-12)
  result = paired_difference(a, b, resamples=300, seed=5, confidence=0.9)
  ordered = np.sort(want)
  for q, got in ((0.05, result.low), (0.95, result.high)):
    pos = q * (len(ordered) - 1)
    lo = int(np.floor(pos))
    ref = ordered[lo] + (pos - lo) * (ordered[lo + 1] - ordered[lo])
    np.testing.assert_allclose(got, ref, rtol=1e-12)
  np.testing.assert_allclose(result.mean, np.mean(np.asarray(a, np.float64) - b), rtol=1e-12)


def test_spread_is_the_two_stage_bootstraps_exact_variance():
  """A resample's statistic is the mean of S independent slots; a slot draws seed J uniformly,
  then N examples of it: its mean is mean_s m_s and its variance
  (1/S) sum_s (m_s - m)^2 + (1/S) sum_s v_s / N (m_s, v_s: seed s's mean and biased variance)."""
  rng = np.random.default_rng(1)
  a, b = _scores(rng, 4, 10, delta=0.0, seed_sd=1.0)
  diff = a - b
  stats = bootstrap_means(diff, resamples=40_000, seed=2)
  seeds, examples = diff.shape
  m, v = diff.mean(axis=1), diff.var(axis=1)
  variance = (np.mean((m - m.mean()) ** 2) + np.mean(v) / examples) / seeds
  np.testing.assert_allclose(stats.mean(), m.mean(), atol=4 * np.sqrt(variance / len(stats)))
  np.testing.assert_allclose(stats.var(), variance, rtol=0.03)


@pytest.mark.parametrize("delta, expected", [(0.5, "more"), (-0.5, "less"), (0.0, "cannot tell")])
def test_verdicts_on_a_known_difference(delta, expected):
  rng = np.random.default_rng(3)
  a, b = _scores(rng, 5, 64, delta=delta, seed_sd=0.1)
  if delta == 0.0:  # exactly no mean difference in every seed
    a = a - (a - b).mean(axis=1, keepdims=True)
  result = paired_difference(a, b)
  assert result.verdict == expected
  assert result.low <= result.mean <= result.high
  np.testing.assert_allclose(result.mean, delta, atol=0.15)
  assert (result.seeds, result.examples, result.resamples) == (5, 64, 10_000)
  assert paired_difference(a, b) == result  # the fixed bootstrap seed: reruns agree


def test_intervals_cover_the_true_difference_about_as_often_as_they_claim():
  rng = np.random.default_rng(4)
  covered = 0
  for _ in range(200):
    a, b = _scores(rng, 30, 20, delta=0.3, seed_sd=0.3)
    r = paired_difference(a, b, resamples=1000, seed=int(rng.integers(1 << 30)))
    covered += r.low <= 0.3 <= r.high
  assert 0.88 <= covered / 200 <= 0.99


def test_verdict_and_bad_input():
  assert (verdict(-2, -1), verdict(1, 2), verdict(-1, 1), verdict(0.0, 1)) == (
      "less",
      "more",
      "cannot tell",
      "cannot tell",
  )
  assert paired_difference([1.0, 2.0], [0.0, 0.0]).seeds == 1  # 1-D: one seed
  with pytest.raises(ValueError, match=r"shapes \(2, 3\) and \(2, 2\) differ"):
    paired_difference(np.ones((2, 3)), np.ones((2, 2)))
  with pytest.raises(ValueError, match="b: holds non-finite"):
    paired_difference([1.0, 2.0], [np.nan, 0.0])
  with pytest.raises(ValueError, match="confidence=1.5"):
    paired_difference([1.0], [0.0], confidence=1.5)
