"""Freed heap memory goes back to the operating system when a phase ends (glibc)."""

from __future__ import annotations

import sys

import pytest
import torch

from rlhf_cli.engine.memory import release_freed_memory


def rss_mib() -> float:
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_freed_blocks_leave_rss_only_after_release():
    blocks = [torch.ones(16 * 1024) for _ in range(2000)]  # 64 KiB each: heap, not mmap
    pinned = torch.ones(16 * 1024)  # above them, so that glibc cannot shrink the heap's top
    del blocks
    before = rss_mib()
    assert release_freed_memory()
    after = rss_mib()
    assert before - after > 60, (before, after)  # ~125 MiB were freed but still resident
    assert pinned.sum() == 16 * 1024
