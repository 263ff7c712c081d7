"""Hand freed heap memory back to the operating system between phases of work (glibc).

glibc keeps freed blocks in the process (and raises its mmap threshold as big blocks come
and go), so RSS stays at the high-water mark of every earlier phase. PPO alternates phases
whose allocations have different shapes (generation with a KV cache, scoring, a no-grad pass
over the whole rollout, then minibatch forward/backward), and one phase reuses the blocks
another freed poorly: on the 106M PPO benchmark, trimming between phases lowered the peak
RSS by 10% (1base-1lora) to 13% (separate) at no measurable cost in time. Elsewhere (macOS,
musl) this does nothing.
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim():
    if not sys.platform.startswith("linux"):
        return None
    try:
        return getattr(ctypes.CDLL("libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def release_freed_memory() -> bool:
    """malloc_trim(0): return free heap pages to the OS. True where it ran."""
    trim = _malloc_trim()
    if trim is None:
        return False
    trim(0)
    return True
