"""The `plain` template on conversations: HH transcripts keep their own text, dialogues get labels.

The HH rows are read from ../shared/data/hh-harmless-dev.jsonl.gz (Anthropic hh-rlhf, MIT
licence in ../shared/data/hh-rlhf.LICENSE); the tests copy a few rows into temporary files only.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cli_helpers import rlhf
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhf_cli.builtin.tokenizer import build_tokenizer
from rlhf_cli.data.files import load_rows
from rlhf_cli.data.preference import (
    ASSISTANT,
    build_preference_dataset,
    hh_conversation,
    hh_split,
    to_preference,
    tokenize_pair,
)
from rlhf_cli.data.preview import preview_prompts
from rlhf_cli.data.prompt_data import build_prompt_dataset, to_prompt
from rlhf_cli.data.prompts import prompt_ids_for_generation
from rlhf_cli.data.sft import IGNORE_INDEX, build_sft_dataset, tokenize_conversation
from rlhf_cli.data.templates import TEMPLATES

HH_FILE = Path(__file__).resolve().parents[2] / "shared" / "data" / "hh-harmless-dev.jsonl.gz"
BOS, EOS = 1, 2
AGENT = [{"role": "system", "content": "You are a tool-using agent."},
         {"role": "user", "content": "What is 2+3?"},
         {"role": "assistant", "content": "CALL add(2,3)"},
         {"role": "tool", "content": "5"},
         {"role": "assistant", "content": "The answer is 5."}]
AGENT_TEXT = ("<s>\n\nSystem: You are a tool-using agent.\n\nHuman: What is 2+3?"
              "\n\nAssistant: CALL add(2,3)</s>\n\nTool: 5\n\nAssistant: The answer is 5.</s>")


@pytest.fixture(scope="module")
def hh_rows():
    """The first 120 HH rows and every row whose whitespace is irregular (double spaces after a
    label, a response with two leading spaces): stripping and re-joining would change those."""
    rows = load_rows(str(HH_FILE))
    return [row for i, row in enumerate(rows) if i < 120 or _irregular(row)]


def _irregular(row: dict) -> bool:
    return any(label + "  " in row[side] for side in ("chosen", "rejected")
               for label in ("\n\nHuman:", ASSISTANT))


@pytest.fixture(scope="module", params=["bytes", "bpe"])
def tok(request, hh_rows):
    """The built-in byte tokenizer, and a byte-level BPE trained here on HH text (merges make
    token boundaries that a segment-by-segment encoding would get wrong)."""
    if request.param == "bytes":
        return build_tokenizer()
    backend = Tokenizer(models.BPE(unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=800, special_tokens=["<unk>", "<s>", "</s>", "<pad>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    backend.train_from_iterator((r["chosen"] for r in hh_rows), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", pad_token="<pad>")


def encode_text(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


# ---------------------------------------------------------------- HH transcripts


def test_hh_pairs_rebuild_the_transcripts_token_for_token(tok, hh_rows):
    assert sum(map(_irregular, hh_rows)) >= 4, "the irregular rows are part of the check"
    examples, report = build_preference_dataset(hh_rows, tok, "plain", 8192, None, "hh")
    usable = [r for r in hh_rows if isinstance(to_preference(r, "r"), tuple)]
    assert report.kept == len(examples) == len(usable)
    for example, row in zip(examples, usable, strict=True):
        prompt = hh_split(row["chosen"], row["rejected"])[0]
        assert example["prompt"] == prompt and prompt.endswith(ASSISTANT)
        n_prompt = 1 + len(encode_text(tok, prompt))
        for side in ("chosen", "rejected"):
            ids, labels = example[f"{side}_input_ids"], example[f"{side}_labels"]
            assert example["prompt"] + example[side] == row[side]
            # the transcript encoded as one text, between our BOS and EOS
            assert ids == [BOS, *encode_text(tok, row[side]), EOS]
            assert tok.decode(ids[1:-1]) == row[side]
            # loss on the response and its EOS only
            assert labels[:n_prompt] == [IGNORE_INDEX] * n_prompt
            assert labels[n_prompt:] == ids[n_prompt:]
            assert tok.decode(ids[n_prompt:-1]) == row[side][len(prompt):]


def test_hh_ppo_prompts_are_the_whole_dialogue(tok, hh_rows):
    examples, report = build_prompt_dataset(hh_rows[:40], tok, "plain", None, "hh")
    assert report.kept == len(examples) == 40
    for example, row in zip(examples, hh_rows[:40], strict=True):
        prompt = hh_split(row["chosen"], row["rejected"])[0]
        assert example["prompt"] == prompt
        assert example["prompt_input_ids"] == [BOS, *encode_text(tok, prompt)]


def test_eval_scoring_sees_hh_prompts_as_ppo_does(hh_rows):
    from rlhf_cli.engine.scoring import prompt_text as scored_prompt

    tok = build_tokenizer()
    for row in hh_rows[:5]:
        conversation = to_prompt(row, "r", keep_text=True)
        prompt = hh_split(row["chosen"], row["rejected"])[0]
        assert scored_prompt(conversation) == prompt
        assert prompt_ids_for_generation(conversation, tok, "plain", None) == [
            BOS, *encode_text(tok, prompt)]


def test_hh_prompt_truncation_keeps_bos_and_the_closing_marker(tok, hh_rows):
    row = next(r for r in hh_rows if r["chosen"].count(ASSISTANT) >= 3)
    conversation, chosen, rejected = to_preference(row, "r", keep_text=True)
    marker = encode_text(tok, ASSISTANT)
    full = tokenize_pair(conversation, chosen, rejected, tok, "plain", 8192)
    cut = tokenize_pair(conversation, chosen, rejected, tok, "plain", 8192, max_prompt_length=30)
    assert cut["truncated"] == ["prompt"]
    n_full = full["chosen_labels"].index(next(x for x in full["chosen_labels"] if x != IGNORE_INDEX))
    n_cut = cut["chosen_labels"].index(next(x for x in cut["chosen_labels"] if x != IGNORE_INDEX))
    assert n_cut == 30
    prompt = cut["chosen_input_ids"][:n_cut]
    # BOS, then the end of the dialogue (cut from the left), ending on "\n\nAssistant:"
    assert prompt[0] == BOS and prompt[1:] == full["chosen_input_ids"][n_full - 29:n_full]
    assert prompt[-len(marker):] == marker
    assert cut["chosen_input_ids"][n_cut:] == full["chosen_input_ids"][n_full:]


def test_other_templates_still_see_parsed_turns(hh_rows):
    tok = build_tokenizer()
    examples, _ = build_preference_dataset(hh_rows[:3], tok, "chatml", 8192, None, "hh")
    text = tok.decode(examples[0]["chosen_input_ids"])
    assert "Human:" not in text and "<|im_start|>user\nwhat are some pranks" in text
    last_human = hh_conversation(hh_split(hh_rows[0]["chosen"], hh_rows[0]["rejected"])[0])[-1]
    assert examples[0]["prompt"] == last_human["content"]


def test_preview_json_reports_the_hh_prompt(rlhf_home, tmp_path, hh_rows):
    data = tmp_path / "hh.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in hh_rows[:3]))
    recipe = tmp_path / "dpo.yaml"
    recipe.write_text(f"stage: dpo\nmodel:\n  base: builtin:tiny\ndata:\n  train: {data}\n"
                      "  max_length: 8192\n")
    proc = rlhf("preview", "--recipe", str(recipe), "--n", "3", "--json", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    items = [json.loads(line) for line in proc.stdout.splitlines()]
    assert len(items) == 3
    for item, row in zip(items, hh_rows[:3], strict=True):
        assert item["prompt"].endswith(ASSISTANT) and item["prompt"].startswith("\n\nHuman:")
        assert item["prompt"].count(ASSISTANT) == row["chosen"][:len(item["prompt"])].count(ASSISTANT)
        for side in ("chosen", "rejected"):
            assert item["prompt"] + item[side] == row[side]
            assert item[f"{side}_text"] == f"<s>{row[side]}</s>"
    prompts, _ = build_prompt_dataset(hh_rows[:3], build_tokenizer(), "plain", None, "hh")
    for item, row in zip(preview_prompts(prompts, 3), hh_rows[:3], strict=True):
        assert item["prompt"] == hh_split(row["chosen"], row["rejected"])[0]


# ---------------------------------------------------------------- multi-turn messages


def test_multi_turn_messages_get_role_labels_and_loss_on_every_answer():
    tok = build_tokenizer()
    example = tokenize_conversation(AGENT, tok, "plain", 512)
    assert tok.decode(example["input_ids"]) == AGENT_TEXT
    trained = [i for i, label in zip(example["input_ids"], example["labels"], strict=True)
               if label != IGNORE_INDEX]
    assert tok.decode(trained) == " CALL add(2,3)</s> The answer is 5.</s>"
    # a single exchange is still joined as it is
    one = tokenize_conversation(AGENT[1:3], tok, "plain", 512)
    assert tok.decode(one["input_ids"]) == "<s>What is 2+3?CALL add(2,3)</s>"


def test_multi_turn_preference_and_ppo_prompts_end_on_the_marker():
    tok = build_tokenizer()
    history = AGENT[:4]
    pair = tokenize_pair(history, "The answer is 5.", "It is 6.", tok, "plain", 512)
    assert tok.decode(pair["chosen_input_ids"]) == AGENT_TEXT
    prompt_len = pair["chosen_labels"].index(next(x for x in pair["chosen_labels"] if x != -100))
    assert tok.decode(pair["rejected_input_ids"][prompt_len:]) == " It is 6.</s>"
    assert tok.decode(pair["chosen_input_ids"][:prompt_len]).endswith("\n\nTool: 5\n\nAssistant:")
    rows = [{"messages": AGENT[1:2]}, {"messages": AGENT}]
    prompts, _ = build_prompt_dataset(rows, tok, "plain", None, "mem")
    assert tok.decode(prompts[0]["prompt_input_ids"]) == "<s>What is 2+3?"  # one exchange
    assert tok.decode(prompts[1]["prompt_input_ids"]) == (
        "<s>\n\nSystem: You are a tool-using agent.\n\nHuman: What is 2+3?\n\nAssistant:")


def test_multi_turn_truncation_keeps_the_marker():
    tok = build_tokenizer()
    long = [{"role": "user", "content": "hi " * 50}, {"role": "assistant", "content": "yo"},
            {"role": "user", "content": "and then?"}, {"role": "assistant", "content": "done"}]
    example = tokenize_conversation(long, tok, "plain", 512, max_prompt_length=22)
    assert example["truncated"] == ["prompt"]
    # the prompt is everything before the first answer: BOS + its last 21 tokens (bytes)
    assert tok.decode(example["input_ids"][:22]) == "<s>hi hi hi \n\nAssistant:"
    assert example["labels"][:22] == [IGNORE_INDEX] * 22 and example["labels"][22] != IGNORE_INDEX
    examples, _ = build_sft_dataset([{"messages": long}], tok, "plain", 512, 22, "mem")
    assert examples[0]["input_ids"] == example["input_ids"]


@pytest.mark.parametrize("template", [t for t in TEMPLATES if t != "plain"])
def test_other_templates_unchanged_on_dialogues(template):
    # the templates with their own role markers never see the plain labels
    tok = build_tokenizer()
    text = tok.decode(tokenize_conversation(AGENT, tok, template, 512)["input_ids"])
    assert "Human:" not in text and "\n\nAssistant:" not in text
