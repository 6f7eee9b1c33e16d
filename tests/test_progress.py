"""Live progress of trainer processes (``epi_jax.progress``), driven by fake metrics files."""

import io
import json
import os
import sys

import pytest

from epi_jax import progress
from epi_jax.progress import MetricsFollower, ProgressBoard, run_trainer


class Clock:

  def __init__(self):
    self.now = 0.0

  def __call__(self) -> float:
    return self.now


class FakeTTY(io.StringIO):

  def isatty(self) -> bool:
    return True


def append(path, *records, partial: str = "") -> None:
  with open(path, "a") as f:
    f.write("".join(json.dumps(r) + "\n" for r in records) + partial)


def plan(total: int) -> dict:
  return {"kind": "plan", "step": 0, "total_steps": total, "stages": 2}


def train(step: int, loss: float) -> dict:
  return {"kind": "train", "step": step, "loss": loss, "lr": 1e-3}


def test_follower_skips_the_earlier_run_and_waits_for_whole_lines(tmp_path):
  path = tmp_path / "metrics.jsonl"
  append(path, plan(9), train(9, 0.1))  # an earlier run's file
  follower = MetricsFollower(str(path))
  assert follower.read() == (False, [])
  os.remove(path)  # the fresh start removes it and writes its own
  append(path, plan(100), train(10, 2.0), partial='{"kind": "train", "st')
  assert follower.read() == (True, [plan(100), train(10, 2.0)])
  assert follower.read() == (False, [])
  with open(path, "a") as f:
    f.write('ep": 20, "loss": 1.5}\n')
  assert follower.read() == (False, [{"kind": "train", "step": 20, "loss": 1.5}])
  with open(path, "w") as f:  # a resume drops the records after its checkpoint
    f.write(json.dumps(plan(100)) + "\n")
  assert follower.read() == (True, [plan(100)])


def test_follower_reads_a_resumed_run_from_its_start(tmp_path):
  path = tmp_path / "metrics.jsonl"
  append(path, plan(100), train(10, 2.0))
  follower = MetricsFollower(str(path))
  append(path, train(20, 1.0))  # the resumed session appends
  assert follower.read() == (True, [plan(100), train(10, 2.0), train(20, 1.0)])


def test_plain_lines_every_interval_with_step_loss_and_eta(tmp_path):
  """Off a terminal: one line per running run every ``every`` seconds; the ETA is the rate
  since the first train record seen (here 1 step/s)."""
  clock, out = Clock(), io.StringIO()
  board = ProgressBoard(out, every=20.0, clock=clock)
  epi, seq = tmp_path / "epi.jsonl", tmp_path / "seq.jsonl"
  board.add("EPI", str(epi))
  board.add("sequential SFT", str(seq))
  append(epi, plan(100), train(10, 2.5))
  clock.now = 10.0
  board.refresh()
  assert out.getvalue() == ""  # not yet 20 s
  clock.now = 20.0
  board.refresh()
  assert out.getvalue() == "EPI: step 10/100 (10%), loss 2.500, ETA ?\nsequential SFT: starting\n"
  append(epi, train(20, 1.75), train(30, 1.25))
  append(seq, plan(50))
  clock.now = 30.0
  board.refresh()  # read (steps 10 -> 30 in 20 s), not printed
  assert len(out.getvalue().splitlines()) == 2
  clock.now = 40.0
  board.message("static isolation: done")
  board.refresh()
  assert out.getvalue().splitlines()[2:] == [
      "static isolation: done",
      "EPI: step 30/100 (30%), loss 1.250, ETA 1m10s",
      "sequential SFT: starting (50 steps)",
  ]
  board.remove("EPI")
  clock.now = 50.0
  board.refresh()
  assert len(out.getvalue().splitlines()) == 5
  clock.now = 60.0
  board.refresh()
  assert out.getvalue().splitlines()[5:] == ["sequential SFT: starting (50 steps)"]


def test_eta_formats_hours_and_skips_a_non_finite_loss(tmp_path):
  clock, out = Clock(), io.StringIO()
  board = ProgressBoard(out, every=1.0, clock=clock)
  path = tmp_path / "m.jsonl"
  board.add("run", str(path))
  append(path, plan(10_000), train(100, float("nan")))
  clock.now = 1.0
  board.refresh()
  append(path, train(101, 3.0))
  clock.now = 3.0
  board.refresh()
  lines = out.getvalue().splitlines()
  assert lines[0] == "run: step 100/10000 (1%), ETA ?"
  assert lines[1] == "run: step 101/10000 (1%), loss 3.000, ETA 5h29m"  # 9899 steps at 2 s each


def test_terminal_redraws_the_lines_in_place(tmp_path, monkeypatch):
  # shutil is the module pytest uses too: the fake takes its arguments (fallback=...).
  fake_size = lambda *_, **__: os.terminal_size((40, 24))
  monkeypatch.setattr(progress.shutil, "get_terminal_size", fake_size)
  clock, out = Clock(), FakeTTY()
  board = ProgressBoard(out, clock=clock)
  a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
  board.add("a", str(a))
  assert out.getvalue() == "a: starting\n"  # nothing above to move over
  cut = "a much longer label of another run: sta\n"  # cut to 39 columns: no line wraps
  up2 = "\x1b[2F\x1b[J"  # to the start of the line 2 up, erase to the end of the screen
  board.add("a much longer label of another run", str(b))
  assert out.getvalue() == "a: starting\n" + "\x1b[1F\x1b[J" + "a: starting\n" + cut
  out.seek(0), out.truncate()
  append(a, plan(40), train(4, 1.0))
  board.refresh()
  assert out.getvalue() == up2 + "a: step 4/40 (10%), loss 1.000, ETA ?\n" + cut
  out.seek(0), out.truncate()
  board.refresh()  # nothing new: nothing written
  assert out.getvalue() == ""
  board.message("b: done")
  assert out.getvalue() == up2 + "b: done\n" + "a: step 4/40 (10%), loss 1.000, ETA ?\n" + cut
  out.seek(0), out.truncate()
  board.remove("a much longer label of another run")
  assert out.getvalue() == up2 + "a: step 4/40 (10%), loss 1.000, ETA ?\n"
  out.seek(0), out.truncate()
  with board:  # leaving the block erases the board
    pass
  assert out.getvalue().endswith("\x1b[1F\x1b[J")
  assert board.drawn == 0


FAKE_TRAINER = """
import json, os, sys, time
run_dir = sys.argv[1]
os.makedirs(run_dir, exist_ok=True)
with open(os.path.join(run_dir, "metrics.jsonl"), "w") as f:
  f.write(json.dumps({"kind": "plan", "step": 0, "total_steps": 4, "stages": 1}) + "\\n")
  for step in range(1, 5):
    f.write(json.dumps({"kind": "train", "step": step, "loss": 1.0 / step}) + "\\n")
    f.flush()
    time.sleep(0.3)
print("trained")
sys.exit(int(sys.argv[2]))
"""


@pytest.mark.parametrize("code", [0, 3])
def test_run_trainer_shows_the_process_while_it_runs(tmp_path, code):
  out = io.StringIO()
  board = ProgressBoard(out, every=0.0, poll=0.05)
  log = tmp_path / "run.log"
  command = [sys.executable, "-c", FAKE_TRAINER, "run", str(code)]
  with board:
    got = run_trainer(
        command,
        run_dir="run",
        log_path=str(log),
        cache_dir=str(tmp_path / "cache"),
        board=board,
        label="fake",
        cwd=str(tmp_path),
    )
  assert got == code
  assert log.read_text() == " ".join(command) + "\ntrained\n"
  lines = out.getvalue().splitlines()
  assert any(line.startswith("fake: step ") and "/4 (" in line for line in lines)
  assert board.runs == {}
