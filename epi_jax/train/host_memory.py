"""What the host's C allocator keeps after a phase of a run frees its buffers.

glibc's malloc gives each thread that allocates an arena of its own (up to 8 per core), serves
blocks below a threshold that grows up to 32 MiB from those arenas, and keeps what is freed
there for reuse instead of returning it to the system. A run's evaluations, orbax's checkpoint
writes (tensorstore's threads, a host copy of the state) and XLA's thread pools free gigabytes
that way, and the process stays that much larger for the rest of the run (docs/benchmarks.md,
"Memory of a SmolLM2 run"). So the trainer sets, at its start, what the ``MALLOC_ARENA_MAX``,
``MALLOC_MMAP_THRESHOLD_`` and ``MALLOC_TRIM_THRESHOLD_`` variables would (2 arenas; blocks of
1 MiB and more mapped on their own, so freeing them returns them), and hands free pages back
after each checkpoint and evaluation (``malloc_trim``). Other C libraries (musl, macOS) have
none of these calls: nothing happens there.
"""

from __future__ import annotations

import ctypes
import os

# mallopt's parameter numbers in glibc's malloc.h, the variable each stands for, our value.
# Setting either threshold also stops glibc from raising the mmap threshold by itself.
SETTINGS = (
    (-8, "MALLOC_ARENA_MAX", 2),
    (-3, "MALLOC_MMAP_THRESHOLD_", 1 << 20),
    (-1, "MALLOC_TRIM_THRESHOLD_", 1 << 20),
)


def _libc():
  try:
    return ctypes.CDLL(None)  # the symbols the process already has
  except OSError:
    return None


_LIBC = _libc()


def configure_malloc() -> list[str]:
  """Applies ``SETTINGS``, each unless its variable is set (glibc read it at start-up). Call it
  before the threads that allocate start. Returns the variables it stood in for."""
  if not hasattr(_LIBC, "mallopt"):
    return []
  return [
      name
      for param, name, value in SETTINGS
      if name not in os.environ and _LIBC.mallopt(param, value)
  ]


def release_free_memory() -> None:
  """Returns the allocator's free pages to the system (``malloc_trim(0)``)."""
  if hasattr(_LIBC, "malloc_trim"):
    _LIBC.malloc_trim(0)
