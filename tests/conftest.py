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


@pytest.fixture
def in_process(rlhf_home, tmp_path, monkeypatch):
    """`rlhf ...` run by rlhf_cli.cli.main in this process, so a test can patch its insides."""
    import torch

    from rlhf_cli import cli

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RLHF_COMMAND", "rlhf (test)")  # restored afterwards; main sets it
    monkeypatch.delenv("RLHF_DEBUG", raising=False)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield lambda *args: cli.main(list(args))
    torch.set_num_threads(threads)
