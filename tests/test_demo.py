"""``python -m epi_jax.demo``: the side-by-side comparison and its verdict."""

import os

import pytest

from epi_jax import demo
from epi_jax.train.loading import load_config, to_dict

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TINY = """
model: {preset: tiny, hidden_size: 32, intermediate_size: 64, num_layers: 1, num_heads: 2}
data: {tasks: [logic_choice, rewrite], n_train: 32, n_eval: 4, seq_len: 112}
method: {p: 0.2, interval: 2, probe_steps: 2}
optim: {lr: 3.0e-3, batch_size: 8}
train: {epochs: 1}
checkpoint: {every: 0}
eval: {max_new_tokens: 4, batch_size: 4}
log: {every: 1, tensorboard: false}
"""


def test_the_demo_is_the_cpu_scratch_preset_run_with_its_own_method():
  """The docs compare the demo's runs with the grid's bit for bit: only the method (and where
  runs go) may differ from configs/replicate/cpu_scratch.yaml."""
  demo_config, preset = (
      to_dict(load_config(os.path.join(ROOT, "configs", *path)))
      for path in (("demo.yaml",), ("replicate", "cpu_scratch.yaml"))
  )
  for config in (demo_config, preset):
    del config["method"], config["run_dir"]
  assert demo_config == preset


def test_verdict_follows_the_numbers():
  seq = {"final": 0.2, "bwt": -0.5, "fr": 90.0}
  better = {"final": 0.4, "bwt": -0.1, "fr": 20.0}
  worse = {"final": 0.1, "bwt": -0.7, "fr": 95.0}
  assert demo.verdict({"multistage": seq, "epi": better}).startswith(
      "EPI forgot less than sequential SFT (BWT -0.100 vs -0.500"
  )
  line = demo.verdict({"multistage": seq, "epi": worse, "static": better})
  assert line.startswith("EPI did not forget less than sequential SFT")
  assert "not above static isolation's (0.400" in line


@pytest.mark.slow
def test_demo_prints_the_comparison_and_writes_a_report(tmp_path, capsys):
  config = tmp_path / "demo.yaml"
  config.write_text(TINY)
  out = tmp_path / "demo"
  methods = ["--methods", "multistage,epi,static", "--jobs", "2"]
  assert demo.main(["--config", str(config), "--out", str(out), *methods]) == 0
  text = capsys.readouterr().out
  for label in ("sequential SFT", "EPI", "static isolation"):
    assert label in text
  assert "verdict: EPI " in text
  report = (out / "report" / "report.md").read_text()
  assert "## Verdict" in report
  assert all(os.path.exists(out / m / "summary.json") for m in demo.METHODS)


def test_demo_rejects_a_bad_method_list(tmp_path):
  with pytest.raises(SystemExit):
    demo.main(["--methods", "epi,static", "--out", str(tmp_path)])
