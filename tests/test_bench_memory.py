"""benchmarks/memory.py's phase peaks: a phase's own peak resident memory, apart from the phases
it calls and from what ran before it."""

import importlib.util
import os
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MIB = 2**20

pytestmark = pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's clear_refs"
)


@pytest.fixture(scope="module")
def memory():
  spec = importlib.util.spec_from_file_location(
      "bench_memory", os.path.join(ROOT, "benchmarks", "memory.py")
  )
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module
  spec.loader.exec_module(module)
  return module


class Job:

  def allocate(self, mib: int) -> float:
    x = np.ones(mib * MIB // 8)  # touched: resident
    return float(x[-1])

  def outer(self) -> None:
    self.allocate(384)
    self.allocate(64)


def test_each_phase_holds_its_own_peak(memory):
  peaks = memory.PhasePeaks()
  job = Job()
  peaks.wrap(job, "allocate", "later allocations", first="first allocation")
  peaks.wrap(job, "outer", "outer")
  job.outer()
  got = {name: peak for name, (peak, _) in peaks.report().items()}
  assert set(got) == {"first allocation", "later allocations", "outer", "other"}
  base = min(got.values())
  assert got["first allocation"] - base == pytest.approx(384 / 1024, abs=48 / 1024)
  assert got["later allocations"] - base == pytest.approx(64 / 1024, abs=48 / 1024)
  # the outer phase's own peak leaves out the 384 MiB its first call held and freed
  assert got["outer"] - base < 48 / 1024
