"""Divergence: its definition on loss sequences, and a run at lr 1e6 stopped (exit 3) or
warned about, with the reason in metrics.jsonl and summary.json."""

import json
import math

import pytest

from epi_jax.train import cli
from epi_jax.train.divergence import Divergence
from tiny_run import tiny_config_file


def first_divergence(losses, vocab_size=100):
  check = Divergence(vocab_size)
  events = [check.update(10 * (i + 1), loss) for i, loss in enumerate(losses)]
  found = [e for e in events if e is not None]
  assert len(found) <= 1  # only the first divergence is reported
  return found[0] if found else None


def test_divergence_is_nonfinite_or_three_logs_above_twice_ln_vocab_or_flat_at_it():
  high = 2 * math.log(100) + 0.01
  assert first_divergence([4.6, 3.0, 1.0, 0.5]) is None
  assert first_divergence([4.6, float("nan"), 1.0])["step"] == 20
  assert first_divergence([4.6, float("inf")])["reason"] == "loss is inf"
  # Two logs above, a dip, two above: never three in a row.
  assert first_divergence([high, high, 9.0, high, high]) is None
  event = first_divergence([4.6, high, high, high, 1.0])
  assert event["step"] == 40 and event["loss"] == high
  assert event["reason"] == "loss above 9.21 (2 x ln vocab_size) at 3 logged steps in a row"
  assert first_divergence([2 * math.log(100)] * 5) is None  # at the threshold is not above
  uniform = math.log(100)
  event = first_divergence([4.9, uniform + 4e-5, uniform - 4e-5, uniform, 3.0])
  assert event["step"] == 40
  assert event["reason"] == (
      "loss flat at ln vocab_size = 4.605 (uniform predictions) at 3 logged steps in a row"
  )
  # Near ln vocab_size as a fresh model is, but not on it to five digits: no divergence.
  assert first_divergence([uniform + 1e-3, uniform - 1e-3, uniform + 5e-4, uniform]) is None


@pytest.mark.parametrize("mode", ["stop", "warn"])
def test_a_run_at_lr_1e6_is_reported_as_diverged(mode, tmp_path, capsys):
  run = tmp_path / "run"
  sets = ["optim.lr=1e6", f"train.on_divergence={mode}"]
  argv = ["--config", tiny_config_file(tmp_path), "--run-dir", str(run)]
  code = cli.main(argv + [x for s in sets for x in ("--set", s)])
  err = capsys.readouterr().err
  summary = json.loads((run / "summary.json").read_text())
  event = summary["divergence"]
  # The update blows the parameters up to where every logit is equal (measured: the loss is
  # ln 320 = 5.76832 to six digits from step 2 on).
  reason = "loss flat at ln vocab_size = 5.768 (uniform predictions) at 3 logged steps in a row"
  assert event["reason"] == reason and event["step"] == 4
  records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
  assert [r for r in records if r["kind"] == "divergence"] == [{"kind": "divergence", **event}]
  assert f"training diverged at step 4: {reason}" in err
  if mode == "warn":
    assert code == 0 and summary["steps"] == 6 and len(summary["accuracy_matrix"]) == 2
    return
  assert code == 3
  assert err.splitlines()[-1] == (
      f"error: {run}: training diverged at step 4 ({reason}); stopped by "
      "train.on_divergence=stop, nothing saved after the last checkpoint"
  )
  assert summary["steps"] == event["step"] and "accuracy_matrix" not in summary
  assert max(r["step"] for r in records) == event["step"]  # nothing after the divergence
  saved = [int(p.name) for p in (run / "checkpoints").iterdir() if p.name.isdigit()]
  assert all(step < event["step"] for step in saved)
