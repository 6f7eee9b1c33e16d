"""benchmarks/memory.py's phase peaks: a phase's own peak resident memory, apart from the phases
it calls and from what ran before it. Measured in a fresh process, so that no other test's
garbage is freed mid-measurement and shifts the baseline."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

pytestmark = pytest.mark.skipif(
    not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux's clear_refs"
)

PHASES = """
import importlib.util, json, sys
import numpy as np
spec = importlib.util.spec_from_file_location("bench_memory", {path!r})
memory = importlib.util.module_from_spec(spec)
spec.loader.exec_module(memory)
MIB = 2**20

class Job:
  def allocate(self, mib):
    x = np.ones(mib * MIB // 8)  # touched: resident
    return float(x[-1])
  def outer(self):
    self.allocate(384)
    self.allocate(64)

peaks = memory.PhasePeaks()
job = Job()
peaks.wrap(job, "allocate", "later allocations", first="first allocation")
peaks.wrap(job, "outer", "outer")
job.outer()
print(json.dumps({{name: peak for name, (peak, _) in peaks.report().items()}}))
"""


def test_each_phase_holds_its_own_peak():
  script = PHASES.format(path=os.path.join(ROOT, "benchmarks", "memory.py"))
  out = subprocess.run(
      [sys.executable, "-c", script], capture_output=True, text=True, check=True, cwd=ROOT
  ).stdout
  got = json.loads(out.splitlines()[-1])
  assert set(got) == {"first allocation", "later allocations", "outer", "other"}
  base = min(got.values())
  assert got["first allocation"] - base == pytest.approx(384 / 1024, abs=48 / 1024)
  assert got["later allocations"] - base == pytest.approx(64 / 1024, abs=48 / 1024)
  # the outer phase's own peak leaves out the 384 MiB its first call held and freed
  assert got["outer"] - base < 48 / 1024
