"""Data sets larger than memory: rows read and examples tokenized when a batch asks for them.

Unit tests check that the lazy examples are exactly the ones the builders made before (same
drops, same order, same ids) and that nothing is held per row beyond a few bytes of index.
The readers of each file format and the measured memory: test_streaming_files.py.
"""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest

from rlhf_cli.builtin.tokenizer import build_tokenizer
from rlhf_cli.data import lazy
from rlhf_cli.data.files import load_rows
from rlhf_cli.data.preference import build_preference_dataset, prompt_text, to_preference, tokenize_pair
from rlhf_cli.data.prompt_data import PromptDrop, build_prompt_dataset, to_prompt
from rlhf_cli.data.prompts import prompt_ids_for_generation
from rlhf_cli.data.sft import (
    DropReason,
    build_sft_dataset,
    loss_on_every_token,
    to_conversation,
    tokenize_conversation,
)
from rlhf_cli.data.unpaired import build_unpaired_dataset, to_unpaired, tokenize_completion
from rlhf_cli.engine.batching import GlobalBatches
from rlhf_cli.errors import UserError

REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


def sft_rows(n: int) -> list[dict]:
    """Kept, truncated (long prompt or response) and dropped (empty response) rows, mixed."""
    rows = []
    for i in range(n):
        kind = i % 5
        if kind == 3:
            rows.append({"prompt": f"sort {i} =", "response": "  "})
        elif kind == 4:
            rows.append({"instruction": "sort " + "zyx" * (i % 13), "input": "", "output": "xyz" * 9})
        else:
            rows.append({"prompt": f"sort {i:05d} =", "response": f" {i}"})
    return rows


def pair_rows(n: int) -> list[dict]:
    rows = []
    for i in range(n):
        kind = i % 4
        rejected = None if kind == 2 else f" {i + 1}" if kind != 3 else f" {i}"
        rows.append({"prompt": f"sort {i:05d} =" + " x" * (i % 7), "chosen": f" {i}",
                     "rejected": rejected})
    return rows


# ------------------------------------------------------------------ what the builders made


def eager_sft(rows, tok, template, max_length, max_prompt_length):
    """The examples and counts as the builder made them before it was lazy (one list)."""
    examples, dropped, truncated = [], Counter(), Counter()
    for i, row in enumerate(rows):
        result = tokenize_conversation(to_conversation(row, f"r{i}"), tok, template, max_length,
                                       max_prompt_length)
        if isinstance(result, DropReason):
            dropped[result] += 1
            continue
        truncated.update(result.pop("truncated"))
        examples.append(result)
    return examples, dropped, truncated


def eager_pairs(rows, tok, template, max_length, max_prompt_length):
    examples, dropped, truncated = [], Counter(), Counter()
    for i, row in enumerate(rows):
        pair = to_preference(row, f"r{i}")
        result = pair if not isinstance(pair, tuple) else tokenize_pair(
            *pair, tok, template, max_length, max_prompt_length)
        if not isinstance(result, dict):
            dropped[result] += 1
            continue
        truncated.update(result.pop("truncated"))
        examples.append({**result, "prompt": prompt_text(pair[0]), "chosen": pair[1],
                         "rejected": pair[2]})
    return examples, dropped, truncated


def test_lazy_sft_examples_are_the_eager_ones(tok):
    rows = sft_rows(60)
    examples, report = build_sft_dataset(rows, tok, "chatml", 40, 24, "mem")
    expected, dropped, truncated = eager_sft(rows, tok, "chatml", 40, 24)
    assert isinstance(examples, lazy.LazyExamples)
    assert report.dropped == dropped and report.truncated == truncated
    assert dropped[DropReason.EMPTY_RESPONSE] == 12 and truncated["prompt"] > 0
    assert report.total == 60 and report.kept == len(examples) == len(expected)
    assert examples == expected and list(examples) == expected
    assert examples[-1] == expected[-1] and examples[3] == expected[3]
    assert examples[1::3] == expected[1::3] and examples[5:2:-1] == expected[5:2:-1]
    assert examples[1::3][2:][1] == expected[1::3][2:][1]  # a view of a view
    assert list(examples.lengths) == [len(e["input_ids"]) for e in expected]
    assert [rows[examples.row_index(i)] for i in range(3)] == [rows[0], rows[1], rows[2]]
    with pytest.raises(IndexError):
        examples[len(expected)]
    whole = [r for r in rows if r.get("response") != "  "]  # nothing dropped: no row index kept
    examples, report = build_sft_dataset(whole, tok, "chatml", 40, 24, "mem")
    assert examples == eager_sft(whole, tok, "chatml", 40, 24)[0] and not report.dropped
    assert isinstance(examples._store.kept, range) and examples.row_index(-1) == len(whole) - 1


def test_lazy_pairs_unpaired_and_prompts_are_the_eager_ones(tok):
    rows = pair_rows(40)
    pairs, report = build_preference_dataset(rows, tok, "plain", 48, 16, "mem")
    expected, dropped, truncated = eager_pairs(rows, tok, "plain", 48, 16)
    assert list(pairs) == expected and report.dropped == dropped and report.truncated == truncated
    assert len(dropped) == 2  # missing and identical

    unpaired_rows = [{"prompt": f"sort {i} =", "completion": f" {i}" if i % 6 else "",
                      "label": i % 3 == 0} for i in range(30)]
    unpaired, report = build_unpaired_dataset(unpaired_rows, tok, "chatml", 64, None, "mem")
    expected = []
    for i, row in enumerate(unpaired_rows):
        item = to_unpaired(row, f"r{i}")
        if isinstance(item, tuple):
            result = tokenize_completion(item[0], item[1], tok, "chatml", 64, None)
            result.pop("truncated")
            expected.append({**result, "label": item[2], "prompt": prompt_text(item[0]),
                             "completion": item[1]})
    assert list(unpaired) == expected and report.kept == 25

    prompt_rows = [{"prompt": "sort " + "ab" * (i % 30) + " ="} for i in range(40)]
    prompts, report = build_prompt_dataset(prompt_rows, tok, "plain", 40, "mem")
    expected = []
    for row in prompt_rows:
        ids = prompt_ids_for_generation(to_prompt(row, "r"), tok, "plain", None)
        if len(ids) <= 40:
            expected.append({"prompt": row["prompt"], "prompt_input_ids": ids})
    assert list(prompts) == expected and report.dropped[PromptDrop.TOO_LONG] == 40 - len(expected) > 0


class CountingRows(list):
    """Rows that count the reads by index (the builders' first pass iterates instead)."""

    reads = 0

    def __getitem__(self, index):
        self.reads += 1
        return super().__getitem__(index)


def test_examples_are_made_when_read_and_only_a_few_kept(tok):
    rows = CountingRows(sft_rows(lazy.CACHE_SIZE * 3))
    examples, _ = build_sft_dataset(rows, tok, "plain", 64, None, "mem")
    assert rows.reads == 0  # nothing tokenized and kept by the first pass
    first = examples[0]
    assert rows.reads == 1 and examples[0] is first  # cached
    for i in range(1, lazy.CACHE_SIZE + 1):
        examples[i]
    reads = rows.reads
    assert examples[0] == first and rows.reads == reads + 1  # evicted, made again, equal


def test_assigned_values_outlive_the_cache(tok):
    """DPO's precomputed reference log-probs are assigned into the examples."""
    pairs, _ = build_preference_dataset(pair_rows(4 * lazy.CACHE_SIZE), tok, "plain", 48, None, "m")
    for i in range(len(pairs)):
        pairs[i]["ref_chosen_logps"] = -float(i)
    pairs[1]["note"] = "kept as an object"
    assert all(pairs[i]["ref_chosen_logps"] == -float(i) for i in range(len(pairs)))
    assert pairs[1]["note"] == "kept as an object" and "note" not in pairs[2]
    assert pairs[2:][0]["ref_chosen_logps"] == -2.0  # views share them


def test_loss_on_every_token_stays_lazy(tok):
    examples, _ = build_sft_dataset(sft_rows(10), tok, "plain", 64, None, "mem")
    everything = loss_on_every_token(examples)
    assert isinstance(everything, lazy.LazyExamples)
    assert list(everything) == loss_on_every_token(list(examples))
    assert everything[0]["labels"] == everything[0]["input_ids"] != examples[0]["labels"]


def test_a_data_file_changed_during_a_run_is_an_error(tok, tmp_path):
    path = tmp_path / "d.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in sft_rows(6)))
    examples, _ = build_sft_dataset(load_rows(str(path)), tok, "plain", 64, None, str(path))
    assert examples[1]["input_ids"]
    text = path.read_text().replace('" 2"', '"22"').replace('" 1"', '"11"')  # same byte offsets
    path.write_text(text)
    with pytest.raises(UserError, match="changed while it was being used") as err:
        examples[2]  # row 2 is line 3
    assert err.value.where == f"{path}:3"


def test_batch_order_is_the_list_shuffle_it_always_was():
    def old(n, size, accum, world, rank, seed, step, per_epoch):
        epoch, position = divmod(step, per_epoch)
        order = list(range(n))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        glob = size * accum * world
        batch = order[position * glob:(position + 1) * glob]
        return [batch[(m * world + rank) * size:(m * world + rank + 1) * size] for m in range(accum)]

    for n, size, accum, world, rank in [(103, 2, 3, 2, 1), (1000, 8, 1, 1, 0), (57, 1, 8, 1, 0)]:
        batches = GlobalBatches(n, size, accum, world, rank, seed=7)
        for step in range(3 * batches.steps_per_epoch + 1):
            assert batches.micro_batches(step) == old(n, size, accum, world, rank, 7, step,
                                                      batches.steps_per_epoch)
    assert batches._order.itemsize == 4  # 4 bytes an example, not a list of ints
