"""The config tables of docs/trainer.md are generated from epi_jax/train/config.py."""

import dataclasses
import difflib
import pathlib
from typing import Literal

import pytest

from epi_jax.train import config_docs
from epi_jax.train.config import bounded

TRAINER_MD = pathlib.Path(__file__).resolve().parents[2] / "docs" / "trainer.md"


def test_docs_trainer_table_matches_config():
  document = TRAINER_MD.read_text()
  written = config_docs.generated_part(document, str(TRAINER_MD))
  expected = config_docs.render()
  diff = "".join(
      difflib.unified_diff(
          written.splitlines(True), expected.splitlines(True), "docs/trainer.md", "generated", n=0
      )
  )
  assert written == expected, (
      f"docs/trainer.md's config table differs from epi_jax/train/config.py; regenerate it "
      f"with `{config_docs.COMMAND}`\n{diff[:3000]}"
  )


@dataclasses.dataclass(frozen=True)
class _Inner:
  rate: float = bounded(0.5, ge=0.0, lt=1.0)
  """Share | of the <run_dir> or `<kept>`."""


@dataclasses.dataclass(frozen=True)
class _Outer:
  mode: Literal["a", "b"] = "b"
  """The mode,
  over two lines."""
  names: list[Literal["x", "y"]] = dataclasses.field(default_factory=lambda: ["x"])
  """Names."""
  flag: bool = False
  """A flag."""
  inner: _Inner = dataclasses.field(default_factory=_Inner)
  """The inner section."""


def test_render_rows_of_each_kind():
  lines = config_docs.render(_Outer).splitlines()
  assert "| `mode` | `str` | `b` | `a`, `b` | The mode, over two lines. |" in lines
  assert "| `names` | `list[str]` | `[x]` | each of `x`, `y` | Names. |" in lines
  assert "| `flag` | `bool` | `false` |  | A flag. |" in lines
  assert lines.index("### `inner`") > lines.index("| `flag` | `bool` | `false` |  | A flag. |")
  assert "The inner section." in lines
  assert (
      "| `inner.rate` | `float` | `0.5` | `>= 0.0`, `< 1.0` | "
      "Share \\| of the &lt;run_dir> or `<kept>`. |"
  ) in lines


def test_undocumented_field_is_named():
  @dataclasses.dataclass
  class Bare:
    documented: int = 1
    """Has a doc."""
    silent: int = 2
    also_silent: str = ""

  with pytest.raises(
      ValueError, match="Bare: no docstring under the field\\(s\\) silent, also_silent"
  ):
    config_docs.field_docs(Bare)


def test_splice_rewrites_only_between_markers():
  document = f"# Title\nbefore\n{config_docs.START}\nold\n{config_docs.END}\nafter\n"
  updated = config_docs.splice(document, "new\n")
  assert updated == f"# Title\nbefore\n{config_docs.START}\nnew\n{config_docs.END}\nafter\n"
  assert config_docs.generated_part(updated) == "new\n"
  with pytest.raises(ValueError, match="x.md: needs one line .* found 1 start and 0 end"):
    config_docs.splice(f"{config_docs.START}\n", "new\n", "x.md")
  with pytest.raises(ValueError, match="found 1 start and 1 end"):
    config_docs.splice(f"{config_docs.END}\n{config_docs.START}\n", "new\n", "x.md")


def test_cli_writes_then_reports_up_to_date(tmp_path, capsys):
  path = tmp_path / "doc.md"
  path.write_text(f"intro\n{config_docs.START}\n{config_docs.END}\noutro\n")
  assert config_docs.main(["--write", str(path)]) == 0
  assert config_docs.generated_part(path.read_text()) == config_docs.render()
  assert config_docs.main(["--write", str(path)]) == 0
  assert capsys.readouterr().out.splitlines() == [
      f"{path}: config table rewritten",
      f"{path}: config table up to date",
  ]
  path.write_text("no markers\n")
  assert config_docs.main(["--write", str(path)]) == 2
  assert path.read_text() == "no markers\n"
