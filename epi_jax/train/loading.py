"""Read a Config from YAML with dotted overrides; every problem is reported at once.

>>> config = load_config("configs/demo.yaml", ["method.p=0.02", "train.steps_per_stage=300"])
"""

from __future__ import annotations

import dataclasses
import importlib.resources
import os
import typing
from collections.abc import Sequence
from typing import Any

import yaml

from epi_jax.data import DATASET_NAMES, TASK_NAMES
from epi_jax.errors import InputError
from epi_jax.train.config import RESUME_FREE, Config
from epi_jax.train.methods import METHODS, make_method


class ConfigError(InputError, ValueError):
  """A configuration that cannot be used; the message names the file and every bad key."""


def _check_value(value: Any, kind: Any, key: str, problems: list[str]) -> Any:
  """``value`` converted to ``kind``, or the value unchanged with a problem appended."""
  origin, args = typing.get_origin(kind), typing.get_args(kind)
  if dataclasses.is_dataclass(kind):
    if not isinstance(value, dict):
      problems.append(f"{key}: must be a mapping (a section), got {value!r}")
      return kind()
    return _build(kind, value, key + ".", problems)
  if origin is typing.Literal:
    if value not in args:
      problems.append(f"{key}: must be one of {', '.join(map(repr, args))}, got {value!r}")
    return value
  if origin is list:
    if not isinstance(value, list):
      problems.append(f"{key}: must be a list, got {value!r}")
      return value
    return [_check_value(v, args[0], f"{key}[{i}]", problems) for i, v in enumerate(value)]
  if origin is dict:
    if not isinstance(value, dict):
      problems.append(f"{key}: must be a mapping, got {value!r}")
      return value
    return {
        _check_value(k, args[0], key, problems): _check_value(v, args[1], f"{key}.{k}", problems)
        for k, v in value.items()
    }
  if kind is float and isinstance(value, str):  # PyYAML reads 1e-5 (no dot) as a string
    try:
      return float(value)
    except ValueError:
      pass
  ok = {
      bool: lambda v: isinstance(v, bool),
      int: lambda v: isinstance(v, int) and not isinstance(v, bool),
      float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
      str: lambda v: isinstance(v, str),
  }[kind]
  if not ok(value):
    problems.append(f"{key}: must be {kind.__name__}, got {type(value).__name__} {value!r}")
    return value
  return float(value) if kind is float else value


def _check_range(value: Any, bounds: dict, key: str, problems: list[str]) -> None:
  tests = {
      "ge": (lambda v, b: v >= b, ">="),
      "gt": (lambda v, b: v > b, ">"),
      "le": (lambda v, b: v <= b, "<="),
      "lt": (lambda v, b: v < b, "<"),
  }
  failed = [
      f"{sign} {bound}"
      for name, bound in bounds.items()
      for test, sign in [tests[name]]
      if not test(value, bound)
  ]
  if failed:
    problems.append(f"{key}: must be {' and '.join(failed)}, got {value!r}")


def _build(cls, raw: dict, prefix: str, problems: list[str]):
  fields = {f.name: f for f in dataclasses.fields(cls)}
  hints = typing.get_type_hints(cls)
  for name in raw:
    if name not in fields:
      problems.append(
          f"{prefix}{name}: unknown key; known keys of "
          f"{prefix.rstrip('.') or 'the top level'}: {', '.join(fields)}"
      )
  values = {}
  for name, f in fields.items():
    if name not in raw:
      continue
    before = len(problems)
    value = _check_value(raw[name], hints[name], prefix + name, problems)
    if len(problems) == before and f.metadata:
      _check_range(value, dict(f.metadata), prefix + name, problems)
    values[name] = value
  return cls(**values)


def _set_dotted(raw: dict, key: str, value: Any, path: str) -> None:
  *parents, leaf = key.split(".")
  node = raw
  for part in parents:
    node = node.setdefault(part, {})
    if not isinstance(node, dict):
      raise ConfigError(f"{path}: --set {key}: {part} is not a section")
  node[leaf] = value


def _cross_checks(config: Config) -> list[str]:
  """Problems that involve several keys."""
  problems = []
  m, o = config.method, config.optim
  if o.micro_batch_size and o.batch_size % o.micro_batch_size:
    problems.append(
        f"optim.micro_batch_size: must divide optim.batch_size={o.batch_size}, "
        f"got {o.micro_batch_size}"
    )
  if config.model.preset == "tiny" and config.model.hidden_size % config.model.num_heads:
    problems.append(
        f"model.num_heads: must divide model.hidden_size="
        f"{config.model.hidden_size}, got {config.model.num_heads}"
    )
  if m.grouping == "given" and m.stages:
    listed = [t for stage in m.stages for t in stage]
    unknown = sorted(set(listed) - set(config.data.tasks))
    if unknown or sorted(listed) != sorted(set(config.data.tasks)):
      problems.append(
          f"method.stages: must use every task of data.tasks exactly once, " f"got {m.stages}"
      )
  if m.grouping == "random" and m.num_stages > len(config.data.tasks):
    problems.append(
        f"method.num_stages: must be <= the {len(config.data.tasks)} tasks, " f"got {m.num_stages}"
    )
  problems += _data_problems(config) + _judge_problems(config)
  if m.type not in METHODS:
    return problems + [
        f"method.type: unknown method {m.type!r}, expected one of " f"{', '.join(METHODS)}"
    ]
  return problems + make_method(config).problems() + _analyses_problems(config)


def _data_problems(config: Config) -> list[str]:
  """Problems of data.tasks and data.files against data.source and model.checkpoint."""
  d, problems = config.data, []
  known = TASK_NAMES if d.source == "synthetic" else DATASET_NAMES
  unknown = [t for t in d.tasks if t not in known]
  if unknown:
    problems.append(
        f"data.tasks: unknown task {', '.join(map(repr, unknown))} for data.source={d.source}; "
        f"known: {', '.join(known)}"
    )
  if not d.tasks or len(set(d.tasks)) != len(d.tasks):
    problems.append(f"data.tasks: must name each task once, got {d.tasks}")
  if d.source == "synthetic" and d.files:
    problems.append("data.files: only data.source=hf reads files")
  if d.source == "synthetic" and d.skip:
    problems.append("data.skip: only data.source=hf skips rows")
  if d.source == "synthetic" and d.shuffle:
    problems.append("data.shuffle: only data.source=hf draws rows (synthetic: data.seed does)")
  stray = sorted(set(d.files) - set(known))
  if stray:
    problems.append(f"data.files: unknown task {', '.join(stray)}; known: {', '.join(known)}")
  return problems


def _judge_problems(config: Config) -> list[str]:
  """eval.judge: a URL with a model, and the environment variable of the key set."""
  j = config.eval.judge
  if not j.url:
    given = [k for k in ("model", "api_key_env") if getattr(j, k)]
    return [f"eval.judge.{k}: set, but eval.judge.url is empty (no judge)" for k in given]
  problems = []
  if not j.url.startswith(("http://", "https://")):
    problems.append(f"eval.judge.url: must start with http:// or https://, got {j.url!r}")
  if not j.model:
    problems.append("eval.judge.model: needed with eval.judge.url")
  if j.api_key_env and not os.environ.get(j.api_key_env):
    problems.append(f"eval.judge.api_key_env: environment variable {j.api_key_env} is not set")
  return problems


def _analyses_problems(config: Config) -> list[str]:
  """Problems of eval.analyses: repeated names, analyses the method or task list cannot serve."""
  names, problems = config.eval.analyses, []
  repeated = sorted({n for n in names if names.count(n) > 1})
  if repeated:
    problems.append(f"eval.analyses: lists {', '.join(repeated)} more than once")
  served = METHODS[config.method.type].analyses
  unserved = [n for n in names if n not in served]
  if unserved:
    problems.append(
        f"eval.analyses: method.type={config.method.type} cannot serve "
        f"{', '.join(unserved)} (it serves {', '.join(served)})"
    )
  pairwise = [n for n in ("gradient_conflict", "task_overlap") if n in names]
  if pairwise and len(config.data.tasks) < 2:
    problems.append(
        f"eval.analyses: {', '.join(pairwise)} compare tasks in pairs: "
        f"data.tasks needs at least 2, got {len(config.data.tasks)}"
    )
  if "task_overlap" in names and config.method.p == 0:
    problems.append("eval.analyses: task_overlap selects top-p masks: method.p must be > 0")
  return problems + _nll_problems(config)


def _nll_problems(config: Config) -> list[str]:
  """Problems of the held-out example counts and the nll keys: too many examples, probe tasks
  that cannot serve."""
  e, d, problems = config.eval, config.data, []
  if e.metric_examples > d.n_eval:
    problems.append(
        f"eval.metric_examples: must be <= data.n_eval={d.n_eval} (the held-out examples), "
        f"got {e.metric_examples}"
    )
  if e.nll_examples > d.n_eval:
    problems.append(
        f"eval.nll_examples: must be <= data.n_eval={d.n_eval} (the held-out examples), "
        f"got {e.nll_examples}"
    )
  if e.probe_tasks and not {"nll", "continual"} & set(e.analyses):
    problems.append(
        "eval.probe_tasks: probe tasks are scored by continual (their metric) or nll: add one "
        "to eval.analyses"
    )
  known = TASK_NAMES if d.source == "synthetic" else DATASET_NAMES
  for task in e.probe_tasks:
    if task not in known:
      problems.append(
          f"eval.probe_tasks: unknown {d.source} task {task!r}; known: {', '.join(known)}"
      )
    elif task in d.tasks:
      problems.append(f"eval.probe_tasks: {task} is trained (in data.tasks); a probe must not be")
  repeated = sorted({t for t in e.probe_tasks if e.probe_tasks.count(t) > 1})
  if repeated:
    problems.append(f"eval.probe_tasks: lists {', '.join(repeated)} more than once")
  return problems


def find_config(path: str) -> str:
  """``path`` where it names a file from the current directory, else the copy the package ships
  (``epi_jax/configs``, the repository's ``configs/``: ``configs/replicate/cpu.yaml`` works
  from any directory and from an installed package); InputError where neither exists."""
  if os.path.isfile(path):
    return path
  shipped = importlib.resources.files("epi_jax").joinpath(path)
  if not os.path.isabs(path) and shipped.is_file():
    return str(shipped)
  raise InputError(f"{path}: no such config file here or in the epi_jax package")


def load_config(path: str, overrides: Sequence[str] = ()) -> Config:
  """Reads YAML ``path``, applies ``KEY=VALUE`` overrides (VALUE parsed as YAML) and checks it all.

  Raises:
    ConfigError: naming ``path`` and every unknown key, wrong type or out-of-range value.
  """
  try:
    with open(path) as f:
      raw = yaml.safe_load(f) or {}
  except (OSError, yaml.YAMLError) as error:
    raise ConfigError(f"{path}: cannot read the config: {error}") from error
  if not isinstance(raw, dict):
    raise ConfigError(f"{path}: the top level must be a mapping of sections")
  for item in overrides:
    key, sep, text = item.partition("=")
    if not sep or not key:
      raise ConfigError(f"{path}: --set {item!r} is not KEY=VALUE")
    _set_dotted(raw, key.strip(), yaml.safe_load(text), path)
  problems: list[str] = []
  config = _build(Config, raw, "", problems)
  if not problems:
    problems = _cross_checks(config)
  if problems:
    raise ConfigError(f"{path}: invalid config:\n  " + "\n  ".join(problems))
  return config


def to_dict(config: Config) -> dict:
  """The config as plain YAML-ready data."""
  return dataclasses.asdict(config)


def _flatten(tree: dict, prefix: str = "") -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict) and key != "files":
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def resume_conflicts(saved: dict, current: Config) -> list[str]:
  """Dotted keys whose values differ between a checkpoint's config and ``current``, except
  those that cannot change the training (RESUME_FREE). A key the saved config lacks (a field
  added since) reads as its default, which is what that run trained with."""
  new = _flatten(to_dict(current))
  old = {**_flatten(to_dict(Config())), **_flatten(saved)}
  keys = sorted(set(old) | set(new))
  return [
      f"{k}: {old.get(k)!r} -> {new.get(k)!r}"
      for k in keys
      if k not in RESUME_FREE and old.get(k) != new.get(k)
  ]
