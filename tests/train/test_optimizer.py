"""The warm-up + cosine learning-rate schedule, over the run or restarted at each stage, against a
NumPy float64 reference."""

import dataclasses
import math

import numpy as np
import pytest

from epi_jax.train.config import Config, OptimSection
from epi_jax.train.optimizer import learning_rate


def reference(steps: list[int], peak: float, warmup_ratio: float, end_ratio: float) -> np.ndarray:
  """lr at every step of consecutive warm-up + cosine schedules of lengths ``steps``."""
  out = []
  for n in steps:
    warmup = round(warmup_ratio * n)
    for u in range(n):
      if u < warmup:
        out.append(peak * u / warmup)
      else:
        cos = 0.5 * (1 + math.cos(math.pi * (u - warmup) / (n - warmup)))
        out.append(peak * (end_ratio + (1 - end_ratio) * cos))
  return np.array(out, np.float64)


def config(schedule: str) -> Config:
  optim = OptimSection(lr=3e-4, warmup_ratio=0.1, end_lr_ratio=0.05, schedule=schedule)
  return dataclasses.replace(Config(), optim=optim)


@pytest.mark.parametrize("schedule", ["run", "stage"])
def test_schedule_matches_the_reference(schedule):
  stages = [20, 30, 10]
  got = np.array([float(learning_rate(config(schedule), stages)(t)) for t in range(60)])
  spans = [sum(stages)] if schedule == "run" else stages
  np.testing.assert_allclose(got, reference(spans, 3e-4, 0.1, 0.05), rtol=1e-5, atol=1e-12)


def test_stage_schedule_restarts_at_each_stage():
  lr = learning_rate(config("stage"), [20, 30, 10])
  assert float(lr(19)) < 0.1 * float(lr(23))  # stage 0's end against stage 1's peak
  assert float(lr(23)) == pytest.approx(3e-4)
  assert float(learning_rate(config("stage"), 20)(5)) == float(lr(5))  # an int: one stage
