"""The trainer's host allocator settings (epi_jax.train.host_memory), each in a fresh process:
the arena cap holds for new threads, freed megabyte blocks go back to the system at once, and
``release_free_memory`` returns freed heap pages."""

import ctypes
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(
    not hasattr(ctypes.CDLL(None), "malloc_trim"), reason="needs glibc's malloc"
)

ARENAS = """
import ctypes, os, re, tempfile, threading
from epi_jax.train.host_memory import configure_malloc
if {limit}:
  assert configure_malloc() == ["MALLOC_ARENA_MAX", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_"]
barrier = threading.Barrier(8)
def work():
  blocks = [bytearray(64 * 1024) for _ in range(16)]
  barrier.wait()
threads = [threading.Thread(target=work) for _ in range(8)]
for t in threads: t.start()
for t in threads: t.join()
libc = ctypes.CDLL(None)
libc.fopen.restype = ctypes.c_void_p
path = tempfile.mktemp()
f = libc.fopen(path.encode(), b"w")
libc.malloc_info(0, ctypes.c_void_p(f))
libc.fclose(ctypes.c_void_p(f))
print(len(re.findall(r'<heap nr="', open(path).read())))
"""

RSS = 'rss = lambda: int(re.search(r"VmRSS:\\s+(\\d+)", open("/proc/self/status").read()).group(1)) / 1024'

BLOCKS = (
    """
import re
from epi_jax.train.host_memory import configure_malloc
if {limit}:
  configure_malloc()
"""
    + RSS
    + """
lift = bytearray(8 << 20)
del lift  # freeing a mapped 8 MiB block lifts glibc's own mmap threshold above it
blocks = [bytearray(2 << 20) for _ in range(150)]  # 300 MiB in 2 MiB blocks
keep = blocks[-1]
before = rss()
del blocks
print(before - rss())
"""
)

TRIM = (
    """
import re
from epi_jax.train.host_memory import release_free_memory
"""
    + RSS
    + """
blocks = [bytearray(64 * 1024) for _ in range(6000)]  # 375 MiB of heap, under the mmap threshold
keep = blocks[-1]  # the heap's top stays in use: free() alone cannot shrink it
del blocks
before = rss()
release_free_memory()
print(before - rss())
"""
)


def _run(code: str, **env: str) -> str:
  return subprocess.run(
      [sys.executable, "-c", code],
      capture_output=True,
      text=True,
      check=True,
      env=os.environ | env,
  ).stdout


@pytest.mark.parametrize("limit", [False, True])
def test_arena_cap_holds_for_new_threads(limit):
  arenas = int(_run(ARENAS.format(limit=limit)))
  if limit:
    assert arenas <= 2
  else:  # each new thread takes an arena of its own without the cap
    assert arenas > 2


@pytest.mark.parametrize("limit", [False, True])
def test_megabyte_blocks_return_when_freed(limit):
  freed = float(_run(BLOCKS.format(limit=limit)))  # MiB
  if limit:
    assert freed > 250
  else:  # glibc keeps them in the heap for reuse
    assert freed < 50


def test_the_users_settings_win():
  code = "from epi_jax.train.host_memory import configure_malloc; print(*configure_malloc())"
  applied = _run(code, MALLOC_ARENA_MAX="4", MALLOC_TRIM_THRESHOLD_="0").split()
  assert applied == ["MALLOC_MMAP_THRESHOLD_"]


def test_release_returns_freed_heap_pages():
  assert float(_run(TRIM)) > 300  # MiB
