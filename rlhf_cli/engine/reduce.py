"""Numbers summed over all processes, by name: every rank gets the same totals."""

from __future__ import annotations

import torch


def global_sums(backend, values: dict[str, float]) -> dict[str, float]:
    """One all-reduce (float64) of named numbers; the same names on every rank, in any order."""
    names = sorted(values)
    tensor = torch.tensor([float(values[n]) for n in names], dtype=torch.float64, device=backend.device)
    return dict(zip(names, backend.all_reduce_sum(tensor).tolist(), strict=True))
