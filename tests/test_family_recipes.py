"""The recipes for other model families (Qwen2.5, Mistral, Gemma 3, BLOOM, Baichuan 2).

They name hub models that cannot be downloaded here, so this checks what a recipe decides:
schema validity (also in test_config), the family's template and LoRA choices, bf16, and that
SFT, DPO and PPO are all covered.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from rlhf_cli.config import load_recipe

REPO = Path(__file__).resolve().parents[1]
# family -> the template its recipes must use: `tokenizer` where the model ships a chat
# template; BLOOM and Baichuan 2 ship none (see the comments in their recipes)
FAMILIES = {"qwen2.5-7b": "tokenizer", "mistral-7b": "tokenizer", "gemma3-1b": "tokenizer",
            "bloom-7b1": "plain", "baichuan2-7b": "alpaca"}
RECIPES = sorted(p for p in (REPO / "recipes").glob("*.yaml")
                 if any(p.name.startswith(f + "-") for f in FAMILIES))


def load(path: Path):
    stage = yaml.safe_load(path.read_text())["stage"]
    return load_recipe(path, stage=stage)


def test_every_family_has_a_preference_or_ppo_recipe_and_all_stages_are_covered(monkeypatch):
    monkeypatch.chdir(REPO)
    stages = {}
    for path in RECIPES:
        family = next(f for f in FAMILIES if path.name.startswith(f + "-"))
        stages.setdefault(family, set()).add(load(path).stage)
    assert set(stages) == set(FAMILIES)
    assert all(found & {"dpo", "ppo"} for found in stages.values()), stages
    assert set().union(*stages.values()) >= {"sft", "dpo", "ppo"}


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_family_recipe_choices(path, monkeypatch):
    monkeypatch.chdir(REPO)  # recipes name DeepSpeed configs relative to the repository
    recipe = load(path)
    family = next(f for f in FAMILIES if path.name.startswith(f + "-"))
    assert recipe.data.template == FAMILIES[family]
    assert recipe.model.dtype == "bf16" and recipe.launch.mixed_precision == "bf16"
    # remote code only where the model needs it (Baichuan's W_pack/NormHead modelling files)
    assert recipe.model.trust_remote_code == (family == "baichuan2-7b")
    lora = recipe.model.lora
    assert lora.target_modules == "auto" and lora.alpha == 2 * lora.r
    if recipe.stage == "ppo":
        assert lora.dropout == 0.0  # the first PPO ratio must be exactly 1
        assert recipe.ppo.arrangement == "1base-1lora"
    if recipe.launch.num_processes > 1:  # the 7B recipes shard like the llama2-7b ones
        assert Path(recipe.launch.deepspeed) == REPO / "recipes" / "deepspeed" / "zero2.json"
    assert recipe.output_dir == f"runs/{path.stem}"
