"""Preference pairs and PPO prompts: formats, HH parsing, shared prompts, masks, truncation, drops."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from rlhf_cli.builtin.tasks import builtin_rows
from rlhf_cli.builtin.tokenizer import build_tokenizer
from rlhf_cli.data.collate import pad_pairs, pad_prompts
from rlhf_cli.data.files import load_rows
from rlhf_cli.data.preference import (
    ASSISTANT,
    HUMAN,
    PairDrop,
    build_preference_dataset,
    hh_conversation,
    hh_split,
    to_preference,
    tokenize_pair,
)
from rlhf_cli.data.preview import (
    preview_preference,
    preview_prompts,
    render_preference_rich,
    render_prompts_rich,
)
from rlhf_cli.data.prompt_data import PromptDrop, build_prompt_dataset, to_prompt
from rlhf_cli.data.prompts import prompt_ids_for_generation
from rlhf_cli.data.sft import IGNORE_INDEX, DropReason
from rlhf_cli.data.templates import TEMPLATES
from rlhf_cli.data.unpaired import build_unpaired_dataset
from rlhf_cli.errors import UserError

# The shared data lies beside the repository (../shared), as in CI.
HH_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-harmless-dev.jsonl.gz"
BOS, EOS, PAD = 1, 2, 3
ANSWER_TEXT = {"plain": "{}", "plain_dialogue": " {}", "alpaca": "{}", "llama2": " {} ",
               "chatml": "{}<|im_end|>", "tokenizer": "{}<|im_end|>"}


@pytest.fixture(scope="module")
def tok():
    tokenizer = build_tokenizer()
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id) == (BOS, EOS, PAD)
    return tokenizer


def pair(conversation, chosen, rejected, tok, template="chatml", max_length=1024, max_prompt=None):
    result = tokenize_pair(conversation, chosen, rejected, tok, template, max_length, max_prompt)
    assert isinstance(result, dict), result
    return result


def split_side(example, side):
    ids, labels = example[f"{side}_input_ids"], example[f"{side}_labels"]
    first = next(i for i, label in enumerate(labels) if label != IGNORE_INDEX)
    return ids[:first], ids[first:], labels


def check_pair(example, tok, template=None, chosen=None, rejected=None):
    prompts = []
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        prompt, answer, labels = split_side(example, side)
        ids = example[f"{side}_input_ids"]
        assert len(ids) == len(labels) and ids[0] == BOS and ids[1] != BOS
        assert labels[: len(prompt)] == [IGNORE_INDEX] * len(prompt)
        assert labels[len(prompt):] == answer, "every answer token and the EOS carry loss"
        assert answer[-1] == EOS and answer.count(EOS) == 1
        if text is not None:
            assert tok.decode(answer) == ANSWER_TEXT[template].format(text) + "</s>"
        prompts.append(prompt)
    assert prompts[0] == prompts[1], "both sides see the same prompt ids"


# ---------------------------------------------------------------- Anthropic HH


def test_hh_file_parses_exactly_and_counts_skips():
    rows = load_rows(str(HH_FILE))
    outcomes = Counter()
    for where, row in zip(rows.locations, rows, strict=True):
        split = hh_split(row["chosen"], row["rejected"])
        assert split is not None, where
        prompt, chosen, rejected = split
        assert prompt + chosen == row["chosen"] and prompt + rejected == row["rejected"], where
        assert prompt.endswith(ASSISTANT) and prompt.startswith(HUMAN), where
        turns = hh_conversation(prompt)
        assert len(turns) == prompt.count(HUMAN) + prompt.count(ASSISTANT) - 1, where
        assert turns[0]["role"] == "user" and turns[-1]["role"] == "user", where
        result = to_preference(row, where)
        outcomes["parsed" if isinstance(result, tuple) else result.value] += 1
        if isinstance(result, tuple):
            assert result[0] == turns and result[1] == chosen.strip(), where
    print(f"\nHH {HH_FILE.name}: {len(rows)} rows, {dict(outcomes)}")
    assert outcomes == {"parsed": 1496, "empty response": 4}


def test_hh_prompt_comes_from_both_texts():
    # the chosen side has one more (garbled) turn: its last "Assistant:" is not the shared one
    chosen = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Who?\n\nAssistant: Me.\n\nAssistant: Bye"
    rejected = "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Who?\n\nAssistant: You."
    prompt, good, bad = hh_split(chosen, rejected)
    assert prompt == "\n\nHuman: Hi\n\nAssistant: Hello\n\nHuman: Who?\n\nAssistant:"
    assert (good, bad) == (" Me.\n\nAssistant: Bye", " You.")
    assert hh_conversation(prompt) == [{"role": "user", "content": "Hi"},
                                       {"role": "assistant", "content": "Hello"},
                                       {"role": "user", "content": "Who?"}]
    # texts diverging right after "Assistant:" and a shared prefix inside the answers
    assert hh_split("\n\nHuman: a\n\nAssistant: Sure", "\n\nHuman: a\n\nAssistant: Sorry") == (
        "\n\nHuman: a\n\nAssistant:", " Sure", " Sorry")
    assert hh_split("\n\nHuman: a\n\nAssistant: x", "\n\nHuman: b\n\nAssistant: x") is None


def test_hh_rows_tokenize_with_shared_prompt(tok):
    rows = load_rows(str(HH_FILE))[:60]
    examples, report = build_preference_dataset(rows, tok, "chatml", 4096, 3072, str(HH_FILE))
    assert report.kept == len(examples) == 60
    for example in examples:
        check_pair(example, tok)
    text = tok.decode(examples[0]["chosen_input_ids"])
    assert "<|im_start|>user\nwhat are some pranks with a pen i can do?<|im_end|>" in text
    assert "Human:" not in text.split("<|im_start|>assistant\n")[0]


# ---------------------------------------------------------------- formats


SIMPLE = [{"role": "user", "content": "Capital of France?"}]


@pytest.mark.parametrize("row", [
    {"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    {"prompt": [{"role": "user", "content": "Capital of France?"}],
     "chosen": [{"role": "assistant", "content": "Paris"}],
     "rejected": [{"role": "assistant", "content": "Lyon"}]},
    {"prompt": "Capital of France?",  # UltraFeedback-binarized: full lists plus the prompt text
     "chosen": [*SIMPLE, {"role": "assistant", "content": "Paris"}],
     "rejected": [*SIMPLE, {"role": "assistant", "content": "Lyon"}]},
    {"chosen": [*SIMPLE, {"role": "assistant", "content": "Paris"}],
     "rejected": [*SIMPLE, {"role": "assistant", "content": "Lyon"}]},
    {"prompt": "Capital of France?", "chosen": {"role": "assistant", "content": "Paris"},
     "rejected": {"role": "assistant", "content": "Lyon"}},
    {"prompt": "Capital of France?", "output": ["Paris", "Lyon"]},
    {"instruction": "Capital of France?", "output": ["Paris", "Lyon"]},
    {"instruction": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"},
    {"chosen": "\n\nHuman: Capital of France?\n\nAssistant: Paris",
     "rejected": "\n\nHuman: Capital of France?\n\nAssistant: Lyon"},
], ids=["strings", "trl_conversational", "ultrafeedback", "chat_pairs", "message_dicts",
        "output_prompt", "output_instruction", "instruction_chosen", "hh"])
def test_formats_agree(row, tok):
    conversation, chosen, rejected = to_preference(row, "r")
    assert [{k: m[k] for k in ("role", "content")} for m in conversation] == SIMPLE
    assert (chosen, rejected) == ("Paris", "Lyon")
    for template in TEMPLATES:
        check_pair(pair(conversation, chosen, rejected, tok, template), tok, template, chosen,
                   rejected)


def test_alpaca_input_and_multi_turn_prompt(tok):
    conversation, _, _ = to_preference(
        {"instruction": "Sum", "input": "2 and 2", "output": ["4", "5"]}, "r")
    example = pair(conversation, "4", "5", tok, "alpaca")
    assert "### Instruction:\nSum\n\n### Input:\n2 and 2\n\n### Response:\n4</s>" in tok.decode(
        example["chosen_input_ids"])
    history = [{"role": "system", "content": "Be brief."}, *SIMPLE,
               {"role": "assistant", "content": "Paris."}, {"role": "user", "content": "Germany?"}]
    row = {"chosen": [*history, {"role": "assistant", "content": "Berlin"}],
           "rejected": [*history, {"role": "assistant", "content": "Bonn"}]}
    conversation, chosen, rejected = to_preference(row, "r")
    assert conversation == history
    for template in TEMPLATES:
        example = pair(conversation, chosen, rejected, tok, template)
        # earlier answer: no loss; plain labels the dialogue ("\n\nAssistant:" then " Berlin")
        check_pair(example, tok, "plain_dialogue" if template == "plain" else template, "Berlin",
                   "Bonn")
        prompt, _, _ = split_side(example, "chosen")
        assert prompt == prompt_ids_for_generation(conversation, tok, template, None)


def test_pitfalls_are_errors_naming_the_row(tmp_path, tok):
    path = tmp_path / "p.jsonl"
    lines = [{"prompt": "a", "chosen": "b", "rejected": "c"},
             {"instruction": "Capital?", "output": "Paris"}]
    path.write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    with pytest.raises(UserError, match="'output' must be a list .chosen, rejected.") as err:
        build_preference_dataset(load_rows(str(path)), tok, "plain", 64, None, str(path))
    assert err.value.where == f"{path}:2"
    bad = [
        ({"prompt": "a", "response": "b"}, "expected fields"),
        ({"prompt": "a", "output": ["b", "c", "d"]}, "got 3 items"),
        ({"chosen": "plain text", "rejected": "other text"}, "Anthropic HH"),
        ({"chosen": [{"role": "assistant", "content": "b"}],
          "rejected": [{"role": "assistant", "content": "c"}]}, "no prompt"),
        ({"prompt": "a", "chosen": [{"role": "user", "content": "b"}], "rejected": "c"},
         "last message of 'chosen' must be the assistant"),
        ({"prompt": "a", "chosen": [{"role": "bot", "content": "b"}], "rejected": "c"},
         "unknown role"),
        ({"prompt": "a", "chosen": ["b", "c"], "rejected": "c"}, "'role' and 'content'"),
        ({"prompt": ["a"], "chosen": "b", "rejected": "c"}, "'role' and 'content'"),
        ({"prompt": "a", "chosen": 3.5, "rejected": {"x": 1}}, "'role' and 'content'"),
    ]
    for row, message in bad:
        with pytest.raises(UserError, match=message) as err:
            build_preference_dataset([row], tok, "plain", 64, None, "mem")
        assert err.value.where.startswith("mem row 1"), row


def test_unusable_rows_are_counted_by_reason(tok):
    ok = {"prompt": "a", "chosen": "b", "rejected": "c"}
    rows = [ok,
            {"prompt": "a", "chosen": "b"},
            {"prompt": "a", "chosen": "b", "rejected": None},
            {"prompt": "a", "output": ["b"]},
            {"prompt": "a", "chosen": "same", "rejected": "same"},
            {"prompt": "a", "chosen": "b", "rejected": "  "},
            {"chosen": "\n\nHuman: x\n\nAssistant: y", "rejected": "\n\nHuman: z\n\nAssistant: y"},
            {"chosen": [*SIMPLE, {"role": "assistant", "content": "b"}],
             "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "c"}]},
            {"prompt": "x" * 100, "chosen": "b", "rejected": "c"}]
    examples, report = build_preference_dataset(rows, tok, "plain", 64, None, "mem")
    assert len(examples) == report.kept == 1 and report.total == len(rows)
    assert report.dropped == {PairDrop.MISSING: 3, PairDrop.IDENTICAL: 1,
                              DropReason.EMPTY_RESPONSE: 1, PairDrop.NO_SHARED_PROMPT: 2,
                              DropReason.NO_ROOM: 1}
    assert report.summary().startswith("dropped 8 of 9 rows: 3 chosen or rejected missing")
    # llama2: BOS + " [/INST]" alone are 9 tokens, so a prompt limit of 9 leaves no prompt text
    assert tokenize_pair(SIMPLE, "b", "c", tok, "llama2", 64, 9) is DropReason.MARKER_TOO_LONG
    with pytest.raises(UserError, match="every row of mem was dropped .*chosen or rejected missing"):
        build_preference_dataset(rows[1:4], tok, "plain", 64, None, "mem")
    with pytest.raises(UserError, match="max_prompt_length must be between"):
        build_preference_dataset(rows, tok, "plain", 64, 63, "mem")


# ---------------------------------------------------------------- tokens


def test_truncation_shares_the_prompt_and_keeps_eos(tok):
    conversation = [{"role": "user", "content": "Explain. " + "blah " * 60}]
    chosen, rejected = "one two three four five six", "short"
    for template, marker in [("alpaca", "### Response:\n"), ("llama2", " [/INST]"),
                             ("chatml", "<|im_start|>assistant\n")]:
        example = pair(conversation, chosen, rejected, tok, template, max_length=48, max_prompt=32)
        check_pair(example, tok)
        prompt, answer, _ = split_side(example, "chosen")
        assert len(prompt) == 32 and tok.decode(prompt).endswith(marker)
        assert len(example["chosen_input_ids"]) == 48
        assert tok.decode(answer) == ANSWER_TEXT[template].format(chosen)[:15] + "</s>"
        assert tok.decode(split_side(example, "rejected")[1]) == (
            ANSWER_TEXT[template].format(rejected) + "</s>")
        assert example["truncated"] == ["prompt", "chosen response"]
    # two answers that differ only after the cut are no pair any more
    cut = tokenize_pair(SIMPLE, "same start, then A", "same start, then B", tok, "plain", 30)
    assert cut is PairDrop.IDENTICAL


def test_marker_merging_with_answer_still_shares_prompt_ids():
    # a BPE with a "\n\n" token: chatml's "assistant\n" merges with an answer starting with "\n"
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"])}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    vocab["ĊĊ"] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[("Ċ", "Ċ")], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token="<pad>")
    example = pair(SIMPLE, "\nParis", "Lyon", tok, "chatml")
    check_pair(example, tok)
    prompt, answer, _ = split_side(example, "chosen")
    assert tok.decode(prompt).endswith("<|im_start|>assistant")
    assert tok.decode(answer) == "\n\nParis<|im_end|></s>"
    assert tok.decode(split_side(example, "rejected")[1]) == "\nLyon<|im_end|></s>"


def test_builtin_sort_pairs(tok):
    rows = builtin_rows("builtin:sort:eval:50", "preference")
    examples, report = build_preference_dataset(rows, tok, "plain", 64, 32, "builtin:sort")
    assert report.summary() == "kept all 50 rows"
    check_pair(examples[0], tok, "plain", rows[0]["chosen"], rows[0]["rejected"])
    assert {k: examples[0][k] for k in ("prompt", "chosen", "rejected")} == rows[0]


def test_unpaired_kto_rows(tok):
    rows = [{"prompt": "Capital?", "completion": "Paris", "label": True},
            {"instruction": "Capital?", "completion": "Lyon", "label": "false"},
            {"prompt": SIMPLE, "completion": [{"role": "assistant", "content": "x"}], "label": 0},
            {"prompt": "Capital?", "completion": None, "label": True}]
    examples, report = build_unpaired_dataset(rows, tok, "chatml", 128, None, "mem")
    assert [e["label"] for e in examples] == [True, False, False]
    assert report.dropped == {PairDrop.MISSING: 1}
    first = examples[0]
    trained = [i for i, label in zip(first["input_ids"], first["labels"], strict=True)
               if label != IGNORE_INDEX]
    assert tok.decode(trained) == "Paris<|im_end|></s>" and first["completion"] == "Paris"
    with pytest.raises(UserError, match="'label' must be true or false"):
        build_unpaired_dataset([{"prompt": "a", "completion": "b", "label": "maybe"}], tok,
                               "plain", 64, None, "mem")


# ---------------------------------------------------------------- collate and preview


def test_pad_pairs_chosen_then_rejected_masks_from_lengths():
    tok = build_tokenizer()
    examples = [pair(SIMPLE, "Paris", "Lyon, surely", tok, "plain"),
                pair(SIMPLE, "It is Paris indeed", "Rome", tok, "plain")]
    batch = pad_pairs(examples, EOS)  # pad == EOS: masks must not come from pad equality
    width = max(len(e[f"{s}_input_ids"]) for e in examples for s in ("chosen", "rejected"))
    assert {k: tuple(v.shape) for k, v in batch.items()} == {
        "input_ids": (4, width), "attention_mask": (4, width), "labels": (4, width)}
    order = [examples[0]["chosen_input_ids"], examples[1]["chosen_input_ids"],
             examples[0]["rejected_input_ids"], examples[1]["rejected_input_ids"]]
    for row, ids in enumerate(order):
        n = len(ids)
        assert batch["input_ids"][row, :n].tolist() == ids
        assert batch["attention_mask"][row].tolist() == [1] * n + [0] * (width - n)
        assert batch["labels"][row, n - 1].item() == EOS
        assert (batch["labels"][row, n:] == IGNORE_INDEX).all()
    prompts = pad_prompts([{"prompt_input_ids": [1, 5, 6]}, {"prompt_input_ids": [1, 7]}], PAD)
    assert prompts["input_ids"].tolist() == [[1, 5, 6], [PAD, 1, 7]]
    assert prompts["attention_mask"].tolist() == [[1, 1, 1], [0, 1, 1]]


def test_preview_contract(tok):
    rows = [{"prompt": "Capital of France?", "chosen": "Paris", "rejected": "Lyon"}]
    examples, _ = build_preference_dataset(rows, tok, "chatml", 128, None, "mem")
    (item,) = preview_preference(examples, tok, 5)
    assert {"prompt", "chosen", "rejected", "chosen_input_ids", "chosen_labels",
            "rejected_input_ids", "rejected_labels"} <= set(item)
    assert (item["prompt"], item["chosen"], item["rejected"]) == ("Capital of France?", "Paris", "Lyon")
    assert item["chosen_text"].endswith("<|im_start|>assistant\nParis<|im_end|></s>")
    json.dumps(item)
    prompts, _ = build_prompt_dataset(rows, tok, "chatml", 128, "mem")
    assert preview_prompts(prompts, 3) == [{"prompt": "Capital of France?",
                                            "prompt_input_ids": prompts[0]["prompt_input_ids"]}]
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render_preference_rich(examples, tok, 1))
    console.print(render_prompts_rich(prompts, tok, 1))
    out = console.export_text()
    assert "Paris<|im_end|></s>" in out and "Lyon" in out and "with loss" in out
    assert f"prompt 1: {len(prompts[0]['prompt_input_ids'])} tokens" in out


# ---------------------------------------------------------------- PPO prompts


def test_prompt_formats(tok):
    turns = [{"role": "system", "content": "Be brief."}, *SIMPLE]
    cases = [
        ({"prompt": "Capital of France?"}, SIMPLE),
        ({"prompt": turns}, turns),
        ({"instruction": "Sum", "input": "2 and 2"},
         [{"role": "user", "content": "Sum", "input": "2 and 2"}]),
        ({"messages": [*turns, {"role": "assistant", "content": "Paris"},
                       {"role": "tool", "content": "x"}]}, turns),
        ({"chosen": "\n\nHuman: Capital of France?\n\nAssistant: Paris",
          "rejected": "\n\nHuman: Capital of France?\n\nAssistant: Paris"}, SIMPLE),  # identical: fine
        ({"prompt": "Capital of France?", "chosen": "Paris"}, SIMPLE),  # no rejected: fine
    ]
    for row, expected in cases:
        assert to_prompt(row, "r") == expected, row
    examples, report = build_prompt_dataset([row for row, _ in cases], tok, "alpaca", 512, "mem")
    assert report.summary() == "kept all 6 rows"
    assert [e["prompt"] for e in examples] == ["Capital of France?"] * 2 + ["Sum\n\n2 and 2"] + [
        "Capital of France?"] * 3
    for (_, conversation), example in zip(cases, examples, strict=True):
        assert example["prompt_input_ids"] == prompt_ids_for_generation(conversation, tok, "alpaca",
                                                                        None)
        assert tok.decode(example["prompt_input_ids"]).endswith("### Response:\n")
    # the PPO prompt is exactly the prompt DPO/RM pairs are conditioned on
    dpo = pair(SIMPLE, "Paris", "Lyon", tok, "alpaca")
    assert split_side(dpo, "chosen")[0] == examples[0]["prompt_input_ids"]


def test_prompt_drops_and_errors(tok):
    rows = [{"prompt": "short"}, {"prompt": "long " * 50},
            {"chosen": "\n\nHuman: a\n\nAssistant: b", "rejected": "\n\nHuman: c\n\nAssistant: b"}]
    examples, report = build_prompt_dataset(rows, tok, "plain", 40, "mem")
    assert len(examples) == 1 and report.dropped == {PromptDrop.TOO_LONG: 1,
                                                     PairDrop.NO_SHARED_PROMPT: 1}
    assert "1 prompt longer than max_prompt_length" in report.summary()
    with pytest.raises(UserError, match="no user turn"):
        to_prompt({"messages": [{"role": "system", "content": "x"}]}, "r")
    with pytest.raises(UserError, match="expected fields 'prompt'") as err:
        build_prompt_dataset([{"text": "x"}], tok, "plain", 40, "mem")
    assert err.value.where == "mem row 1"
    with pytest.raises(UserError, match="every row of mem was dropped"):
        build_prompt_dataset(rows[1:2], tok, "plain", 40, "mem")
