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


@pytest.fixture(scope="module")
def rm_run(rlhf_home, tmp_path_factory) -> Path:
    """An RM run directory on builtin:tiny: final/ holds the adapter, head and tokenizer.

    For the in-process PPO arrangement tests: built the way `rlhf rm` builds one (a SEQ_CLS LoRA
    adapter with its score head) with random non-zero weights and LoRA dropout 0.3, so the reward,
    critic and reference paths differ from one another and a mix-up shows. test_ppo_e2e.py and
    test_rm_dpo_e2e.py define their own `rm_run` (a real `rlhf rm` run), which wins there.
    """
    import torch

    from rlhf_cli.config import load_recipe
    from rlhf_cli.models.policy import tokenizer_for
    from rlhf_cli.stages.rm import reward_model

    recipe = load_recipe(REPO / "recipes" / "tiny-rm.yaml", ["model.lora.dropout=0.3"])
    tokenizer = tokenizer_for(recipe)
    torch.manual_seed(0)
    model = reward_model(recipe, tokenizer, announce=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "score" in name:
                param.normal_(0, 0.05)
    run = tmp_path_factory.mktemp("rm_run")
    model.save_pretrained(str(run / "final"))
    tokenizer.save_pretrained(str(run / "final"))
    return run
