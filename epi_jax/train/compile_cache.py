"""The environment under which trainer subprocesses share one persistent JAX compilation cache."""

from __future__ import annotations

import os


def shared_cache_env(cache_dir: str) -> dict[str, str]:
  """``os.environ`` with JAX's persistent compilation cache in ``cache_dir``, keeping every
  program (JAX's defaults skip those that compile in under a second: here the parameter
  initializers and the evaluation's decode steps, recompiled by every run). A threshold the
  user set in the environment is kept."""
  env = dict(os.environ)
  env["JAX_COMPILATION_CACHE_DIR"] = os.path.abspath(cache_dir)
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "-1")
  return env
