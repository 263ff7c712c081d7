"""Shared fixtures: every test writes the built-in model under its own temporary home."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def rlhf_home(tmp_path_factory) -> Path:
    """One built-in model cache for the whole session (materialising is deterministic)."""
    home = tmp_path_factory.mktemp("rlhf_home")
    os.environ["RLHF_HOME"] = str(home)
    return home


@pytest.fixture
def repo() -> Path:
    return REPO
