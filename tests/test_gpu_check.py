"""scripts/gpu_check.sh, which needs a CUDA GPU: its no-GPU exit, its plan (dry mode), and the
memory metrics it reads from metrics.jsonl (peak CUDA memory beside the RSS)."""

from __future__ import annotations

import torch

from rlhf_cli.engine import memory


def test_memory_metrics_add_the_cuda_peak_only_where_cuda_is_in_use(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert "cuda_peak_mb" not in memory.memory_metrics()
    assert memory.memory_metrics()["rss_mb"] > 0
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device=None: 3 * 2**20 + 2**19)
    assert memory.memory_metrics()["cuda_peak_mb"] == 3.5
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: False)  # never touched: no key
    assert "cuda_peak_mb" not in memory.memory_metrics()
