"""Trainer processes launched by the demo and the replication runner, with live progress.

``run_trainer`` runs one ``python -m epi_jax.train`` process and shows it on a
``ProgressBoard``: one line per running run (step of total, loss, ETA), read from the
``metrics.jsonl`` the run writes as it trains (its ``plan`` record gives the total). On a
terminal the lines are redrawn in place; otherwise (a CI log) they are printed every
``every`` seconds.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

from epi_jax.train.compile_cache import shared_cache_env


class MetricsFollower:
  """Reads the records appended to a ``metrics.jsonl`` since the last ``read``.

  The file as it is at construction belongs to an earlier run and is ignored until it changes;
  from then on it is read from its start, and again from the start whenever it is replaced or
  cut (a fresh start removes it, a resume drops its last records).
  """

  def __init__(self, path: str):
    self.path = path
    self.stale = self._signature()
    self.inode: int | None = None  # None: nothing read yet
    self.offset = 0

  def _signature(self) -> tuple[int, int, int] | None:
    try:
      st = os.stat(self.path)
    except FileNotFoundError:
      return None
    return st.st_ino, st.st_size, st.st_mtime_ns

  def read(self) -> tuple[bool, list[dict]]:
    """(whether the file started over, the new complete records)."""
    signature = self._signature()
    if signature is None or signature == self.stale:
      return False, []
    self.stale = None
    inode, size, _ = signature
    restart = inode != self.inode or size < self.offset
    if restart:
      self.inode, self.offset = inode, 0
    try:
      with open(self.path, "rb") as f:
        f.seek(self.offset)
        data = f.read()
    except FileNotFoundError:  # removed since the stat: the next read starts the new file
      return restart, []
    complete = data[: data.rfind(b"\n") + 1]  # a line still being written waits
    self.offset += len(complete)
    records = []
    for line in complete.splitlines():
      try:
        records.append(json.loads(line))
      except ValueError:
        continue
    return restart, records


def _duration(seconds: float) -> str:
  seconds = round(seconds)
  if seconds >= 3600:
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
  return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class RunProgress:
  """What one run's records say: step, total, loss, and an ETA from the observed step rate."""

  def __init__(self, label: str, metrics_path: str):
    self.label = label
    self.follower = MetricsFollower(metrics_path)
    self._clear()

  def _clear(self) -> None:
    self.total: int | None = None
    self.step: int | None = None
    self.loss: float | None = None
    self.first: tuple[float, int] | None = None  # (time, step) of the first train record seen
    self.last: tuple[float, int] | None = None

  def update(self, now: float) -> None:
    """Reads the new records, observed at time ``now``."""
    restart, records = self.follower.read()
    if restart:
      self._clear()
    trained = False
    for record in records:
      if record.get("kind") == "plan":
        self.total = record["total_steps"]
      elif record.get("kind") == "train":
        self.step, self.loss, trained = record["step"], record.get("loss"), True
    if trained:
      # Records read at once share one time: the rate counts from the last of the first batch.
      if self.first is None:
        self.first = (now, self.step)
      else:
        self.last = (now, self.step)

  def eta(self) -> float | None:
    """Seconds left at the mean rate since the first train record seen; None before two."""
    if self.total is None or self.first is None or self.last is None:
      return None
    (t0, s0), (t1, s1) = self.first, self.last
    if s1 <= s0 or t1 <= t0:
      return None
    return (self.total - s1) * (t1 - t0) / (s1 - s0)

  def line(self) -> str:
    if self.step is None:
      return f"{self.label}: starting" + (f" ({self.total} steps)" if self.total else "")
    total = "?" if self.total is None else self.total
    out = f"{self.label}: step {self.step}/{total}"
    if self.total:
      out += f" ({100 * self.step / self.total:.0f}%)"
    if self.loss is not None and math.isfinite(self.loss):
      out += f", loss {self.loss:.3f}"
    eta = self.eta()
    return out + f", ETA {'?' if eta is None else _duration(eta)}"


class ProgressBoard:
  """One live line per running run, written to ``stream``.

  On a terminal the lines are redrawn in place when they change, checked every ``poll``
  seconds (the cursor moves up over the lines drawn before, which are erased); otherwise each
  running run's line is printed every ``every`` seconds. ``message`` writes a line above the
  board. Use as a context manager: a thread refreshes the board until the block ends.
  """

  def __init__(
      self,
      stream: TextIO | None = None,
      *,
      every: float = 20.0,
      poll: float = 0.5,
      clock: Callable[[], float] = time.monotonic,
  ):
    self.stream = sys.stdout if stream is None else stream
    self.tty = self.stream.isatty()
    self.every, self.poll, self.clock = every, poll, clock
    self.runs: dict[str, RunProgress] = {}
    self.drawn = 0  # lines of the board on the terminal now
    self.shown: list[str] = []  # and what they say
    self.printed = clock()  # when the plain lines were last printed
    self.lock = threading.RLock()
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None

  def add(self, label: str, metrics_path: str) -> None:
    """Follows a run that is about to start (its current ``metrics.jsonl`` is an earlier one's)."""
    with self.lock:
      self.runs[label] = RunProgress(label, metrics_path)
      self._draw()

  def remove(self, label: str) -> None:
    with self.lock:
      self.runs.pop(label, None)
      self._draw()

  def message(self, text: str) -> None:
    """``text`` on its own line, above the live lines."""
    with self.lock:
      self._erase()
      self.stream.write(text + "\n")
      self._draw()

  def refresh(self) -> None:
    """Reads every run's new records and shows them (printed only when ``every`` has passed,
    off a terminal)."""
    with self.lock:
      now = self.clock()
      for run in self.runs.values():
        run.update(now)
      if self.tty:
        self._draw()
      elif self.runs and now - self.printed >= self.every:
        self.printed = now
        self.stream.write("".join(run.line() + "\n" for run in self.runs.values()))
        self.stream.flush()

  def _erase(self) -> None:
    if self.tty and self.drawn:
      self.stream.write(f"\x1b[{self.drawn}F\x1b[J")  # up to the board's first line, erase below
    self.drawn = 0

  def _draw(self) -> None:
    """Redraws the live lines where they changed (on a terminal; each cut to its width, so none
    wraps)."""
    if not self.tty:
      self.stream.flush()
      return
    width = shutil.get_terminal_size().columns - 1
    lines = [run.line()[:width] for run in self.runs.values()]
    if lines == self.shown and self.drawn == len(lines):
      return
    self._erase()
    self.stream.write("".join(line + "\n" for line in lines))
    self.drawn, self.shown = len(lines), lines
    self.stream.flush()

  def __enter__(self) -> ProgressBoard:
    self._stop.clear()
    self._thread = threading.Thread(target=self._loop, daemon=True)
    self._thread.start()
    return self

  def _loop(self) -> None:
    while not self._stop.wait(self.poll):
      self.refresh()

  def __exit__(self, *exc) -> None:
    self._stop.set()
    self._thread.join()
    with self.lock:
      self._erase()
      self.stream.flush()


def run_trainer(
    command: list[str],
    *,
    run_dir: str,
    log_path: str,
    cache_dir: str,
    board: ProgressBoard,
    label: str,
    cwd: str | None = None,
    append: bool = True,
) -> int:
  """Runs ``command`` (a trainer writing ``run_dir``) with its output in ``log_path`` (after a
  line with the command), shown on ``board`` as ``label`` while it runs; returns its exit
  code. The runs share the JAX compilation cache ``cache_dir``."""
  board.add(label, os.path.join(cwd or "", run_dir, "metrics.jsonl"))
  try:
    with open(log_path, "a" if append else "w") as log:
      log.write(" ".join(command) + "\n")
      log.flush()
      return subprocess.run(
          command, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, env=shared_cache_env(cache_dir)
      ).returncode
  finally:
    board.remove(label)
