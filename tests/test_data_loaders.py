"""data/loaders.py: each stage's data, read as the recipe says (checked against the builders)."""

from __future__ import annotations

import json

import pytest
from cli_helpers import REPO

from rlhf_cli.config import load_recipe
from rlhf_cli.data import loaders
from rlhf_cli.data.preference import build_preference_dataset
from rlhf_cli.data.sft import IGNORE_INDEX
from rlhf_cli.data.sources import load_source
from rlhf_cli.data.unpaired import UnpairedView
from rlhf_cli.errors import UserError
from rlhf_cli.models.policy import tokenizer_for


class Quiet:
    is_main = False  # a non-main process: the loaders print nothing


def recipe(name: str, *overrides: str):
    return load_recipe(REPO / "recipes" / name, list(overrides))


@pytest.mark.parametrize("completion_only", [True, False])
def test_sft_examples_carry_the_loss_the_recipe_asks_for(rlhf_home, completion_only):
    sft = recipe("tiny-sft.yaml", "data.train=builtin:sort:train:16",
                 f"sft.completion_only={str(completion_only).lower()}")
    examples = loaders.load_sft(sft, tokenizer_for(sft), sft.data.train, "data.train", Quiet())
    assert len(examples) == 16
    for example in examples:
        prompt_masked = example["labels"][0] == IGNORE_INDEX
        assert prompt_masked == completion_only
        if not completion_only:
            assert example["labels"] == example["input_ids"]


def test_unpaired_examples_from_pairs_are_a_view_of_two_each(rlhf_home):
    dpo = recipe("tiny-dpo.yaml", "dpo.loss_type=kto", "data.train=builtin:sort:train:8")
    tokenizer = tokenizer_for(dpo)
    examples = loaders.load_unpaired(dpo, tokenizer, dpo.data.train, "data.train", Quiet())
    pairs, _ = build_preference_dataset(load_source(dpo.data.train, "preference"), tokenizer,
                                        dpo.data.template, dpo.data.max_length,
                                        dpo.data.max_prompt_length, source=dpo.data.train)
    assert isinstance(examples, UnpairedView) and len(examples) == 2 * len(pairs)
    assert examples[2]["input_ids"] == pairs[1]["chosen_input_ids"] and examples[2]["label"]
    assert examples[3]["labels"] == pairs[1]["rejected_labels"] and not examples[3]["label"]


def test_unpaired_rows_are_read_as_such(rlhf_home, tmp_path):
    rows = tmp_path / "kto.jsonl"
    rows.write_text("".join(json.dumps({"prompt": f"sort {w}", "completion": "".join(sorted(w)),
                                        "label": i % 2 == 0}) + "\n"
                            for i, w in enumerate(["cab", "dcba", "zyx"])))
    dpo = recipe("tiny-dpo.yaml", "dpo.loss_type=kto")
    examples = loaders.load_unpaired(dpo, tokenizer_for(dpo), str(rows), "data.train", Quiet())
    assert not isinstance(examples, UnpairedView)
    assert [e["label"] for e in examples] == [True, False, True]
    assert all(IGNORE_INDEX in e["labels"] and e["labels"][-1] != IGNORE_INDEX for e in examples)


def test_ppo_prompts_leave_room_for_the_response(rlhf_home):
    ppo = recipe("tiny-ppo-1base-1lora.yaml", "data.max_prompt_length=null", "data.max_length=20",
                 "ppo.max_new_tokens=8")
    prompts = loaders.load_prompts(ppo, tokenizer_for(ppo), Quiet())
    assert max(len(p["prompt_input_ids"]) for p in prompts) <= 20 - 8
    no_room = recipe("tiny-ppo-1base-1lora.yaml", "data.max_prompt_length=null",
                     "data.max_length=8", "ppo.max_new_tokens=8")
    with pytest.raises(UserError, match="no room for ppo.max_new_tokens"):
        loaders.load_prompts(no_room, tokenizer_for(no_room), Quiet())
