"""The extras: the core imports without them, and a feature that needs a missing one is refused
in one line naming it (exit 2 at the command line), before any work."""

import os
import pathlib
import subprocess
import sys

import pytest

from epi_jax import demo
from epi_jax.eval import code_scores
from epi_jax.extras import MissingExtra, require
from epi_jax.replicate import cli as replicate
from epi_jax.report import cli as report

ROOT = pathlib.Path(__file__).resolve().parents[1]
PLOTS = "error: drawing the report's plots needs the report extra (no module matplotlib): "
INSTALL_REPORT = "pip install 'epi-jax[report]'\n"


def test_require_names_the_extra(monkeypatch):
  assert require("json", "eval", "anything").dumps([1]) == "[1]"
  monkeypatch.setitem(sys.modules, "codebleu", None)  # as if it were not installed
  with pytest.raises(MissingExtra) as error:
    require("codebleu", "eval", "the codebleu metric")
  assert str(error.value) == (
      "the codebleu metric needs the eval extra (no module codebleu): pip install 'epi-jax[eval]'"
  )


@pytest.mark.parametrize("module", ["codebleu", "tree_sitter_python"])
def test_codebleu_without_the_eval_extra(monkeypatch, module):
  monkeypatch.setitem(sys.modules, module, None)
  with pytest.raises(
      MissingExtra, match=rf"^the codebleu metric needs the eval extra \(no module {module}\)"
  ):
    code_scores(["x = 1"], ["x = 2"])


def test_report_without_matplotlib_is_one_line(monkeypatch, tmp_path, capsys):
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  assert report.main([str(tmp_path / "run"), "--out", str(tmp_path / "report")]) == 2
  assert capsys.readouterr().err == PLOTS + INSTALL_REPORT


def test_demo_and_runner_refuse_before_training(monkeypatch, tmp_path, capsys):
  """Both end with the report's plots: without matplotlib they stop before the first run."""
  monkeypatch.setitem(sys.modules, "matplotlib", None)
  assert demo.main(["--out", str(tmp_path / "demo")]) == 2
  assert replicate.main(["--preset", "cpu", "--seeds", "1", "--out", str(tmp_path / "grid")]) == 2
  assert capsys.readouterr().err == (PLOTS + INSTALL_REPORT) * 2
  assert os.listdir(tmp_path) == []


CORE_ONLY = """
import sys
for name in ("datasets", "pyarrow", "codebleu", "tree_sitter", "tree_sitter_python", "matplotlib"):
  sys.modules[name] = None  # none of the extras is installed
import epi_jax, epi_jax.data, epi_jax.demo, epi_jax.eval, epi_jax.export, epi_jax.models
import epi_jax.replicate.cli, epi_jax.report.cli, epi_jax.train.cli, epi_jax.train.loop
print("imported")
"""


def test_the_core_imports_without_the_extras():
  out = subprocess.run(
      [sys.executable, "-c", CORE_ONLY],
      cwd=ROOT,
      capture_output=True,
      text=True,
      env=os.environ | {"PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
      timeout=300,
  )
  assert (out.returncode, out.stdout) == (0, "imported\n"), out.stderr
