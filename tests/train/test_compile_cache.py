"""The shared compilation-cache environment of the replication runner and the demo."""

import os

from epi_jax.train.compile_cache import shared_cache_env


def test_shared_cache_env_caches_every_program(monkeypatch, tmp_path):
  monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", raising=False)
  monkeypatch.delenv("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", raising=False)
  monkeypatch.setenv("EPI_JAX_TEST_MARKER", "kept")
  env = shared_cache_env(str(tmp_path / "cache"))
  assert env["JAX_COMPILATION_CACHE_DIR"] == os.path.abspath(tmp_path / "cache")
  assert env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "0"
  assert env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] == "-1"
  assert env["EPI_JAX_TEST_MARKER"] == "kept"
  assert "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ  # a copy


def test_shared_cache_env_keeps_the_users_thresholds(monkeypatch, tmp_path):
  monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "2.5")
  assert shared_cache_env(str(tmp_path))["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] == "2.5"
