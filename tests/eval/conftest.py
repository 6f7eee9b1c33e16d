"""The judge tests talk to a server on 127.0.0.1: no proxy may take those requests."""

import pytest

_PROXY_VARIABLES = (
    "http_proxy",
    "https_proxy",
    "all_proxy",
    "HTTP_PROXY",
    "HTTPS_PROXY",
    "ALL_PROXY",
)


@pytest.fixture(autouse=True)
def no_proxy(monkeypatch):
  for name in _PROXY_VARIABLES:
    monkeypatch.delenv(name, raising=False)
