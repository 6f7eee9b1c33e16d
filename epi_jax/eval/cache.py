"""A directory of before-training evaluations, one JSON file per key: every method of a seed
starts from the same untrained model, so the first run evaluates it and the others read it."""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Callable
from typing import Any


def cache_key(*parts: Any) -> str:
  """SHA-256 of the JSON of ``parts`` (strings, numbers, lists)."""
  return hashlib.sha256(json.dumps(parts).encode()).hexdigest()


def cached(
    cache_dir: str, name: str, key: Callable[[], str], compute: Callable[[], Any], *, writes: bool
) -> tuple[Any, dict]:
  """``compute()``, or what an earlier call stored under ``cache_dir/{name}_{key()}.json``.

  Args:
    cache_dir: the cache directory; "" for none (``key`` is then not called).
    name: the file name's prefix, one per kind of evaluation.
    key: computes the key (hashing parameters can take a while).
    compute: the evaluation; its result must survive a JSON round trip unchanged.
    writes: whether this process writes the file (one process of a multi-process run does).

  Returns:
    (the result, ``{"file": path or None, "hit": read back or not, "time_s": seconds}``).
  """
  start = time.perf_counter()
  path = os.path.join(cache_dir, f"{name}_{key()}.json") if cache_dir else None
  hit = bool(path) and os.path.exists(path)
  if hit:
    with open(path) as f:
      value = json.load(f)
  else:
    value = compute()
    if path and writes:
      os.makedirs(cache_dir, exist_ok=True)
      with open(path + ".tmp", "w") as f:
        json.dump(value, f)
      os.replace(path + ".tmp", path)
  return value, {"file": path, "hit": hit, "time_s": time.perf_counter() - start}
