"""SFT data: loading, templates, loss masks, BOS/EOS placement, truncation, drops, collation."""

from __future__ import annotations

import gzip
import json

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
from transformers import PreTrainedTokenizerFast

from rlhf_cli.data.collate import pad_batch
from rlhf_cli.data.files import load_rows
from rlhf_cli.data.preview import preview_sft, render_preview_rich
from rlhf_cli.data.sft import (
    IGNORE_INDEX,
    DropReason,
    build_sft_dataset,
    to_conversation,
    tokenize_conversation,
)
from rlhf_cli.data.templates import TEMPLATES, get_template, is_dialogue, render_prompt
from rlhf_cli.errors import UserError

BOS, EOS = 1, 2

CHATML_JINJA = (
    "{{ bos_token }}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# meta-llama/Llama-2-7b-chat-hf's chat_template (it writes BOS and EOS as text)
LLAMA2_JINJA = (
    "{% if messages[0]['role'] == 'system' %}{% set loop_messages = messages[1:] %}"
    "{% set system_message = messages[0]['content'] %}{% else %}"
    "{% set loop_messages = messages %}{% set system_message = false %}{% endif %}"
    "{% for message in loop_messages %}{% if loop.index0 == 0 and system_message != false %}"
    "{% set content = '<<SYS>>\\n' + system_message + '\\n<</SYS>>\\n\\n' + message['content'] %}"
    "{% else %}{% set content = message['content'] %}{% endif %}"
    "{% if message['role'] == 'user' %}{{ bos_token + '[INST] ' + content.strip() + ' [/INST]' }}"
    "{% elif message['role'] == 'assistant' %}{{ ' '  + content.strip() + ' ' + eos_token }}"
    "{% endif %}{% endfor %}"
)


def make_tokenizer(add_bos: bool = True, pad: str = "<pad>", chat_template: str | None = None):
    """LLaMA-like ids (<unk>=0 <s>=1 </s>=2 <pad>=3), byte-level BPE without merges: offline."""
    vocab = {t: i for i, t in enumerate(["<unk>", "<s>", "</s>", "<pad>"])}
    for char in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[char] = len(vocab)
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    if add_bos:
        backend.post_processor = processors.TemplateProcessing(
            single="<s> $A", pair="<s> $A $B", special_tokens=[("<s>", BOS)])
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                  unk_token="<unk>", pad_token=pad)
    tok.chat_template = chat_template or CHATML_JINJA
    return tok


@pytest.fixture(params=["adds_bos", "no_bos", "pad_is_eos"], scope="module")
def tok(request):
    tokenizer = {"adds_bos": lambda: make_tokenizer(add_bos=True),
                 "no_bos": lambda: make_tokenizer(add_bos=False),
                 "pad_is_eos": lambda: make_tokenizer(pad="</s>")}[request.param]()
    assert tokenizer.bos_token_id == BOS and tokenizer.eos_token_id == EOS
    return tokenizer


ONE_TURN = [{"role": "user", "content": "What is the capital of France?"},
            {"role": "assistant", "content": "Paris is the capital."}]
MULTI = [{"role": "system", "content": "Be brief."},
         {"role": "user", "content": "Weather in Rome?"},
         {"role": "assistant", "content": "Let me check."},
         {"role": "tool", "content": "sunny, 24C"},
         {"role": "assistant", "content": "Sunny and 24C."},
         {"role": "user", "content": "Thanks"},
         {"role": "assistant", "content": "You're welcome."}]
# what each template trains on for one assistant turn (then EOS)
RESPONSE_TEXT = {"plain": "{}", "alpaca": "{}", "llama2": " {} ", "chatml": "{}<|im_end|>",
                 "tokenizer": "{}<|im_end|>"}


def encode(conversation, tok, template, max_length=2048, max_prompt_length=None):
    result = tokenize_conversation(conversation, tok, template, max_length, max_prompt_length)
    assert isinstance(result, dict), result
    return result


def loss_runs(example):
    """Contiguous runs of trained token ids."""
    runs, current = [], []
    for token_id, label in zip(example["input_ids"], example["labels"], strict=True):
        if label == IGNORE_INDEX:
            if current:
                runs.append(current)
            current = []
        else:
            current.append(token_id)
    return runs + ([current] if current else [])


def check_invariants(example, tok, template, conversation):
    ids, labels = example["input_ids"], example["labels"]
    assert len(ids) == len(labels)
    assert ids[0] == BOS and ids[1] != BOS, "exactly one BOS at the start"
    answers = [m["content"] for m in conversation if m["role"] == "assistant"]
    # Meta's llama2 format opens every exchange with its own BOS; the others have one in all
    assert ids.count(BOS) == (len(answers) if template == "llama2" else 1)
    assert ids[-1] == EOS and labels[-1] == EOS, "final EOS carries loss"
    assert all(label in (IGNORE_INDEX, token) for token, label in zip(ids, labels, strict=True))
    # plain labels a dialogue's turns: "\n\nAssistant:" (no loss), then " answer" (loss)
    dialogue = template == "plain" and is_dialogue(conversation)
    expected = [(" {}" if dialogue else RESPONSE_TEXT[template]).format(a) + "</s>" for a in answers]
    assert [tok.decode(run) for run in loss_runs(example)] == expected
    assert ids.count(EOS) == len(answers), "one EOS per assistant turn, never doubled"


@pytest.mark.parametrize("template", list(TEMPLATES))
@pytest.mark.parametrize("conversation", [ONE_TURN, MULTI], ids=["one_turn", "multi_turn"])
def test_templates_mask_bos_eos(tok, template, conversation):
    example = encode(conversation, tok, template)
    check_invariants(example, tok, template, conversation)


def test_exact_renderings():
    tok = make_tokenizer()
    text = {name: tok.decode(encode(ONE_TURN, tok, name)["input_ids"]) for name in TEMPLATES}
    assert text["plain"] == "<s>What is the capital of France?Paris is the capital.</s>"
    assert text["llama2"] == ("<s>[INST] What is the capital of France? [/INST] "
                              "Paris is the capital. </s>")
    assert text["chatml"] == ("<s><|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                              "<|im_start|>assistant\nParis is the capital.<|im_end|></s>")
    assert text["tokenizer"] == text["chatml"]
    assert text["alpaca"].endswith("### Instruction:\nWhat is the capital of France?\n\n"
                                   "### Response:\nParis is the capital.</s>")
    multi = tok.decode(encode(MULTI[:3], tok, "llama2")["input_ids"])
    assert multi == ("<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWeather in Rome? [/INST] "
                     "Let me check. </s>")


def test_hf_llama2_chat_template_matches_llama2_template():
    tok = make_tokenizer(chat_template=LLAMA2_JINJA)
    conversation = [MULTI[0], MULTI[1], MULTI[2], MULTI[5], MULTI[6]]  # alternating roles
    assert encode(conversation, tok, "tokenizer") == encode(conversation, tok, "llama2")


def test_slow_tokenizer_fallback_encodes_segment_by_segment():
    class Slow:  # a tokenizer without offset mappings
        def __init__(self, fast):
            self._fast = fast

        def __getattr__(self, name):
            return getattr(self._fast, name)

        is_fast = False

    fast = make_tokenizer()
    for name in TEMPLATES:
        assert encode(MULTI, Slow(fast), name) == encode(MULTI, fast, name)


def test_template_text_or_data_containing_bos_eos_is_not_doubled(tok):
    conversation = [{"role": "user", "content": "<s>Hi"},
                    {"role": "assistant", "content": "Hello</s>"}]
    example = encode(conversation, tok, "plain")
    assert example["input_ids"][:2] == [BOS] + tok.encode("H", add_special_tokens=False)
    assert example["input_ids"].count(EOS) == 1 and example["labels"][-1] == EOS


def test_alpaca_with_and_without_input(tok):
    with_input = to_conversation({"instruction": "Sum", "input": "2 and 2", "output": "4"}, "r")
    without = to_conversation({"instruction": "Sum 2 and 2", "input": "", "output": "4"}, "r")
    text = tok.decode(encode(with_input, tok, "alpaca")["input_ids"])
    assert text == ("<s>Below is an instruction that describes a task, paired with an input that "
                    "provides further context. Write a response that appropriately completes the "
                    "request.\n\n### Instruction:\nSum\n\n### Input:\n2 and 2\n\n"
                    "### Response:\n4</s>")
    text = tok.decode(encode(without, tok, "alpaca")["input_ids"])
    assert text == ("<s>Below is an instruction that describes a task. Write a response that "
                    "appropriately completes the request.\n\n### Instruction:\nSum 2 and 2\n\n"
                    "### Response:\n4</s>")
    # templates without an Input slot append it to the instruction
    assert "Sum\n\n2 and 2<|im_end|>" in tok.decode(encode(with_input, tok, "chatml")["input_ids"])


def test_string_output_is_trained_whole_not_first_character(tok):
    conversation = to_conversation({"instruction": "Capital?", "output": "Paris"}, "r")
    example = encode(conversation, tok, "alpaca")
    assert tok.decode(loss_runs(example)[0]) == "Paris</s>"
    with pytest.raises(UserError, match="'output' must be a string"):
        to_conversation({"instruction": "Capital?", "output": ["Paris", "Lyon"]}, "r")


def test_missing_fields_name_the_formats_and_the_line(tmp_path, tok):
    path = tmp_path / "d.jsonl"
    path.write_text('{"prompt": "a", "response": "b"}\n\n{"instruction": "x"}\n')
    with pytest.raises(UserError) as err:
        build_sft_dataset(load_rows(str(path)), tok, "alpaca", 64, None, str(path))
    assert err.value.where == f"{path}:3"
    assert "'instruction' + 'output'" in str(err.value) and "'messages'" in str(err.value)
    with pytest.raises(UserError, match="row 1"):
        build_sft_dataset([{"text": "x"}], tok, "plain", 64, None, "mem")
    with pytest.raises(UserError, match="unknown role"):
        to_conversation({"messages": [{"role": "bot", "content": "x"}]}, "r")
    with pytest.raises(UserError, match="no assistant turn"):
        to_conversation({"messages": [{"role": "user", "content": "x"}]}, "r")


def test_trailing_user_turn_is_removed():
    conversation = to_conversation({"messages": [*ONE_TURN, {"role": "user", "content": "?"}]}, "r")
    assert conversation == ONE_TURN


def test_prompt_truncated_from_left_keeps_bos_and_marker(tok):
    long = {"instruction": "Explain. " + "blah " * 100, "output": "Short answer."}
    for template, marker in [("alpaca", "### Response:\n"), ("llama2", " [/INST]"),
                             ("chatml", "<|im_start|>assistant\n")]:
        example = encode(to_conversation(long, "r"), tok, template, 256, max_prompt_length=40)
        first = next(i for i, label in enumerate(example["labels"]) if label != IGNORE_INDEX)
        prompt = example["input_ids"][:first]
        assert len(prompt) == 40 and prompt[0] == BOS and prompt[1] != BOS
        assert tok.decode(prompt).endswith(marker)
        assert example["truncated"] == ["prompt"]
        check_invariants(example, tok, template, to_conversation(long, "r"))


def test_response_truncated_from_right_keeps_final_eos(tok):
    conversation = [{"role": "user", "content": "Count"},
                    {"role": "assistant", "content": "one two three four five six seven"}]
    full = encode(conversation, tok, "alpaca")
    limit = full["labels"].count(IGNORE_INDEX) + 10  # the prompt and 9 response tokens + EOS
    example = encode(conversation, tok, "alpaca", max_length=limit)
    assert len(full["input_ids"]) > limit and len(example["input_ids"]) == limit
    assert tok.decode(example["input_ids"]).endswith("### Response:\none two t</s>")
    assert example["input_ids"][-1] == EOS and example["labels"][-1] == EOS
    assert example["truncated"] == ["response"]
    loss = tok.decode(loss_runs(example)[0])
    assert loss.endswith("</s>") and "one two three four five six seven".startswith(loss[:-4])


def test_multi_turn_cut_in_later_user_turn_ends_on_previous_answer(tok):
    full = encode(MULTI, tok, "chatml")
    first_eos = full["input_ids"].index(EOS)
    example = encode(MULTI, tok, "chatml", max_length=first_eos + 5)
    assert example["input_ids"] == full["input_ids"][: first_eos + 1]
    assert example["labels"] == full["labels"][: first_eos + 1]


def test_too_long_rows_dropped_and_counted(tok):
    rows = [{"prompt": "hi", "response": "ok"},
            {"prompt": "hello", "response": "  "},
            {"prompt": "x" * 300, "response": "y"}]
    examples, report = build_sft_dataset(rows, tok, "chatml", 100, None, "mem")
    assert report.total == 3 and report.kept == 1 and len(examples) == 1
    assert report.dropped == {DropReason.EMPTY_RESPONSE: 1, DropReason.NO_ROOM: 1}
    assert report.summary() == ("dropped 2 of 3 rows: 1 empty response, 1 prompt leaves no room "
                                "for the response within max_length")
    # BOS + " [/INST]" is 9 tokens: with max_prompt_length 9 no prompt text would remain
    assert tokenize_conversation(ONE_TURN, tok, "llama2", 64, 9) is DropReason.MARKER_TOO_LONG
    with pytest.raises(UserError, match="every row of mem was dropped .*1 prompt template markers"):
        build_sft_dataset(rows[:1], tok, "llama2", 64, 9, "mem")
    _, report = build_sft_dataset(rows[:1], tok, "llama2", 64, 10, "mem")
    assert report.summary() == "kept all 1 rows; truncated 1 prompts"


def test_template_errors(tok):
    with pytest.raises(UserError, match="plain, alpaca, llama2, chatml, tokenizer"):
        get_template("vicuna")
    bare = make_tokenizer()
    bare.chat_template = None
    with pytest.raises(UserError, match="chat_template"):
        build_sft_dataset([{"prompt": "a", "response": "b"}], bare, "tokenizer", 64, None, "m")


def test_render_prompt_ends_with_marker(tok):
    from rlhf_cli.data.templates import encode_segments

    for name, marker in [("alpaca", "### Response:\n"), ("llama2", " [/INST]"),
                         ("chatml", "<|im_start|>assistant\n"),
                         ("tokenizer", "<|im_start|>assistant\n")]:
        segments = render_prompt(get_template(name), ONE_TURN[:1], tok)
        ids = [t.id for t in encode_segments(segments, tok)]
        assert ids[0] == BOS and tok.decode(ids).endswith(marker)


# ---------------------------------------------------------------- files


def test_jsonl_gz_json_csv_parquet(tmp_path):
    rows = [{"instruction": "a", "input": "", "output": "b"},
            {"instruction": "c", "input": "d", "output": "e"}]
    gz = tmp_path / "d.jsonl.gz"
    with gzip.open(gz, "wt") as handle:
        handle.write("\n".join(json.dumps(r) for r in rows) + "\n\n")
    assert load_rows(str(gz)) == rows
    (tmp_path / "d.json").write_text(json.dumps({"train": rows}))
    assert load_rows(str(tmp_path / "d.json")) == rows
    (tmp_path / "l.json").write_text("\n".join(json.dumps(r) for r in rows))
    assert load_rows(str(tmp_path / "l.json")) == rows
    import pandas as pd

    pd.DataFrame(rows).to_csv(tmp_path / "d.csv", index=False)
    loaded = load_rows(str(tmp_path / "d.csv"))
    assert loaded == rows and loaded[0]["input"] == ""  # empty cell: "" not NaN
    pd.DataFrame(rows).to_parquet(tmp_path / "d.parquet")
    assert load_rows(str(tmp_path / "d.parquet")) == rows


def test_file_errors(tmp_path, monkeypatch):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n\n{"prompt": "a", \n')
    with pytest.raises(UserError, match="malformed JSON") as err:
        load_rows(str(bad))
    assert err.value.where == f"{bad}:3"
    bad.write_text('{"prompt": "a", "response": "b"}\n[1, 2]\n')
    with pytest.raises(UserError, match="expected a JSON object") as err:
        load_rows(str(bad))
    assert err.value.where == f"{bad}:2"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="no rows"):
        load_rows(str(empty))
    with pytest.raises(UserError, match="not found: .*missing.jsonl"):
        load_rows(str(tmp_path / "missing.jsonl"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE"):
        load_rows("some-org/some-dataset")


# ---------------------------------------------------------------- collate and preview


def test_pad_batch_uses_lengths_not_pad_equality():
    tok = make_tokenizer(pad="</s>")
    short = encode(ONE_TURN, tok, "plain")
    long = encode(MULTI, tok, "plain")
    batch = pad_batch([short, long], tok.pad_token_id, pad_to_multiple_of=8)
    width = batch["input_ids"].shape[1]
    assert width % 8 == 0 and width >= len(long["input_ids"])
    n = len(short["input_ids"])
    assert batch["attention_mask"][0].tolist() == [1] * n + [0] * (width - n)
    assert batch["labels"][0, n - 1].item() == EOS  # the real EOS keeps its loss
    assert (batch["labels"][0, n:] == IGNORE_INDEX).all()
    assert (batch["input_ids"][0, n:] == EOS).all()


def test_preview(tok):
    examples = [encode(ONE_TURN, tok, "chatml")]
    (item,) = preview_sft(examples, tok, 5)
    assert set(item) == {"input_ids", "labels", "text", "loss_text"}
    assert item["loss_text"] == "Paris is the capital.<|im_end|></s>"
    assert item["text"].startswith("<s><|im_start|>user")
    from rich.console import Console

    console = Console(record=True, width=200)
    console.print(render_preview_rich(examples, tok, 1))
    out = console.export_text()
    assert "Paris is the capital." in out and f"{len(item['input_ids'])} tokens" in out
