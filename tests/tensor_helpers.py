"""Comparing tensors with numbers worked out by hand (the algorithm tests)."""

from __future__ import annotations

import torch


def close(actual, expected, atol=1e-5):
    actual = torch.as_tensor(actual)
    torch.testing.assert_close(actual, torch.tensor(expected, dtype=actual.dtype), atol=atol, rtol=0)


def t(*values):
    return torch.tensor(values, dtype=torch.float32)
