"""Config loading: overrides, and errors that name the file and the key."""

import pytest

from epi_jax.train.config import Config
from epi_jax.train.loading import ConfigError, load_config, resume_conflicts, to_dict


def write(tmp_path, text):
  path = tmp_path / "run.yaml"
  path.write_text(text)
  return str(path)


def test_defaults_and_dotted_overrides(tmp_path):
  path = write(tmp_path, "method:\n  type: static\noptim:\n  lr: 1e-4\n")
  config = load_config(
      path,
      [
          "method.p=0.02",
          "data.tasks=[arithmetic, rewrite]",
          "method.stages=[[rewrite], [arithmetic]]",
      ],
  )
  assert config.method.type == "static" and config.method.p == 0.02
  assert config.optim.lr == 1e-4 and isinstance(config.optim.lr, float)
  assert config.method.stages == [["rewrite"], ["arithmetic"]]
  assert config.mesh.tensor == Config().mesh.tensor


@pytest.mark.parametrize(
    "text, key, words",
    [
        ("model:\n  prest: tiny\n", "model.prest", "unknown key"),
        ("bogus: 1\n", "bogus", "unknown key"),
        ("optim:\n  batch_size: 'big'\n", "optim.batch_size", "must be int"),
        ("log:\n  tensorboard: 3\n", "log.tensorboard", "must be bool"),
        ("method:\n  type: lorax\n", "method.type", "unknown method 'lorax'"),
        ("method:\n  p: 1.5\n", "method.p", "must be < 1.0"),
        ("method:\n  beta: -0.1\n", "method.beta", "must be >= 0.0"),
        ("optim:\n  lr: 0\n", "optim.lr", "must be > 0.0"),
        ("optim:\n  batch_size: 64\n  micro_batch_size: 5\n", "optim.micro_batch_size", "divide"),
    ],
)
def test_errors_name_file_and_key(tmp_path, text, key, words):
  path = write(tmp_path, text)
  with pytest.raises(ConfigError) as error:
    load_config(path)
  message = str(error.value)
  assert path in message and f"{key}:" in message and words in message


def test_all_problems_reported_at_once_including_overrides(tmp_path):
  path = write(tmp_path, "model:\n  bogus: 1\n")
  with pytest.raises(ConfigError) as error:
    load_config(path, ["method.interval=0", "train.epochs=fast"])
  message = str(error.value)
  assert "model.bogus" in message and "method.interval" in message and "train.epochs" in message


def test_resume_conflicts_ignore_logging_keys(tmp_path):
  path = write(tmp_path, "")
  saved = to_dict(load_config(path))
  changed = load_config(path, ["log.every=3", "checkpoint.keep=9", "method.p=0.5", "optim.lr=0.1"])
  conflicts = resume_conflicts(saved, changed)
  assert [c.split(":")[0] for c in conflicts] == ["method.p", "optim.lr"]


def test_resume_conflicts_read_a_missing_key_as_its_default(tmp_path):
  """A run saved before a field existed trained with that field's default."""
  path = write(tmp_path, "")
  saved = to_dict(load_config(path))
  del saved["data"]["skip"]
  assert resume_conflicts(saved, load_config(path)) == []
  changed = load_config(path, ["data.seed=5"])
  saved["data"].pop("seed")
  assert resume_conflicts(saved, changed) == ["data.seed: 0 -> 5"]
