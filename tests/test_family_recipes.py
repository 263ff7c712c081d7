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


# Chat templates in the layout of the families whose recipes use `tokenizer` (written here
# from the published formats; text markers, since the built-in tokenizer has no such tokens).
FAMILY_CHAT_TEMPLATES = {
    # Qwen2.5: ChatML, a default system turn when the row has none, no BOS
    "qwen2.5-7b": (
        "{% if messages[0]['role'] != 'system' %}<|im_start|>system\nYou are Qwen, created by "
        "Alibaba Cloud. You are a helpful assistant.<|im_end|>\n{% endif %}"
        "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"),
    # Mistral v0.3: BOS, [INST] user[/INST] answer EOS, roles must alternate
    "mistral-7b": (
        "{{ bos_token }}{% for m in messages %}"
        "{% if (m['role'] == 'user') != (loop.index0 % 2 == 0) %}"
        "{{ raise_exception('roles must alternate') }}{% endif %}"
        "{% if m['role'] == 'user' %}[INST] {{ m['content'] }}[/INST]"
        "{% else %}{{ ' ' + m['content'] + eos_token }}{% endif %}{% endfor %}"),
    # Gemma 3: BOS, <start_of_turn>user|model ... <end_of_turn>, system joins the first turn
    "gemma3-1b": (
        "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
        "{% set prefix = messages[0]['content'] + '\n\n' %}{% set turns = messages[1:] %}"
        "{% else %}{% set prefix = '' %}{% set turns = messages %}{% endif %}"
        "{% for m in turns %}<start_of_turn>{{ 'model' if m['role'] == 'assistant' else 'user' }}\n"
        "{{ (prefix if loop.first else '') + m['content'] | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}"),
}
GENERATION_PROMPT = {"qwen2.5-7b": "<|im_start|>assistant\n", "mistral-7b": "[/INST]",
                     "gemma3-1b": "<start_of_turn>model\n"}
END_OF_ANSWER = {"qwen2.5-7b": "<|im_end|></s>", "mistral-7b": "</s>",
                 "gemma3-1b": "<end_of_turn></s>"}


@pytest.mark.parametrize("family", FAMILY_CHAT_TEMPLATES)
def test_tokenizer_template_of_the_family_reads_multi_turn_hh_rows(family):
    """The recipes' `tokenizer` template locates every answer of multi-turn HH rows."""
    from rlhf_cli.builtin.tokenizer import build_tokenizer
    from rlhf_cli.data.files import load_rows
    from rlhf_cli.data.preference import build_preference_dataset, to_preference
    from rlhf_cli.data.sft import IGNORE_INDEX

    hh = REPO.parent / "shared" / "data" / "hh-harmless-dev.jsonl.gz"
    rows = [r for r in load_rows(str(hh))[:60] if r["chosen"].count("\n\nHuman:") >= 2][:15]
    tok = build_tokenizer()
    tok.chat_template = FAMILY_CHAT_TEMPLATES[family]
    examples, report = build_preference_dataset(rows, tok, "tokenizer", 8192, None, "hh")
    assert report.kept == len(examples) == len(rows) == 15
    for example, row in zip(examples, rows, strict=True):
        _, chosen, _ = to_preference(row, "r")
        ids, labels = example["chosen_input_ids"], example["chosen_labels"]
        first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
        assert tok.decode(ids[:first]).endswith(GENERATION_PROMPT[family])
        answer = tok.decode(ids[first:])
        assert answer.strip() == chosen + END_OF_ANSWER[family]
        assert labels[first:] == ids[first:] and ids.count(tok.bos_token_id) <= 1
