"""The embedded default: tokenizer, deterministic models, materialize, and the sort task."""

from __future__ import annotations

import importlib
import random
import threading

import pytest
import torch

from rlhf_cli.builtin import model as builtin_model
from rlhf_cli.builtin.model import (
    MARKER,
    SIZES,
    build_model,
    count_params,
    materialize,
    resolve_builtin,
)
from rlhf_cli.builtin.tasks import (
    LETTERS,
    MISTAKES,
    builtin_reward_fn,
    builtin_rows,
    sort_exact,
    sort_reward,
    sort_rows,
)
from rlhf_cli.builtin.tokenizer import build_tokenizer
from rlhf_cli.errors import UserError

TEXTS = [
    "sort dcba = abcd",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\r\n",
    "héllo wörld — 日本語 🙂",
    "<|im_start|>user\nhi<|im_end|>\n",
    "",
]


@pytest.fixture(scope="module")
def tok():
    return build_tokenizer()


@pytest.fixture(autouse=True)
def _rlhf_home(tmp_path, monkeypatch):
    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))


# --- tokenizer -------------------------------------------------------------------------


def test_special_token_ids(tok):
    assert (tok.unk_token_id, tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (0, 1, 2, 3)
    assert tok.pad_token_id != tok.eos_token_id
    assert len(tok) == 260
    assert tok.model_max_length == 2048
    assert tok.padding_side == "right"


def test_bytes_map_to_ids_4_to_259(tok):
    assert tok("A", add_special_tokens=False)["input_ids"] == [4 + ord("A")]
    assert tok("é", add_special_tokens=False)["input_ids"] == [4 + 0xC3, 4 + 0xA9]


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tok, text):
    ids = tok(text)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == text
    assert len(ids) == 1 + len(text.encode("utf-8"))


def test_bos_once_and_no_eos(tok):
    ids = tok("abc")["input_ids"]
    assert ids[0] == tok.bos_token_id
    assert ids.count(tok.bos_token_id) == 1
    assert tok.eos_token_id not in ids
    assert tok.bos_token_id not in tok("abc", add_special_tokens=False)["input_ids"]


def test_padding_uses_pad_on_the_right(tok):
    batch = tok(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0][-2:] == [tok.pad_token_id] * 2
    assert batch["attention_mask"][0] == [1, 1, 1, 0, 0]


def test_chat_template(tok):
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]
    text = tok.apply_chat_template(messages, tokenize=False)
    assert text == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nyo<|im_end|>\n"
    prompt = tok.apply_chat_template(messages[:1], tokenize=False, add_generation_prompt=True)
    assert prompt.endswith("<|im_end|>\n<|im_start|>assistant\n")
    assert tok.bos_token not in prompt  # BOS comes from encoding, not from the template
    assert tok(prompt)["input_ids"].count(tok.bos_token_id) == 1


def test_tokenizer_is_deterministic(tok):
    assert build_tokenizer().backend_tokenizer.to_str() == tok.backend_tokenizer.to_str()


# --- models ----------------------------------------------------------------------------


def test_build_model_is_deterministic_and_keeps_rng():
    torch.manual_seed(7)
    before = torch.get_rng_state()
    a = build_model("tiny").state_dict()
    assert torch.equal(torch.get_rng_state(), before)
    torch.rand(3)  # a different global state must not change the weights
    b = build_model("tiny").state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert all(v.dtype == torch.float32 for v in a.values())


def test_model_config_ids():
    model = build_model("tiny")
    for config in (model.config, model.generation_config):
        assert (config.bos_token_id, config.eos_token_id, config.pad_token_id) == (1, 2, 3)
    assert not model.config.tie_word_embeddings
    # widened LM head (see model._widen_lm_head): logits can get confident under LoRA
    expected = model.config.hidden_size**-0.5
    assert abs(model.lm_head.weight.std().item() - expected) < 0.1 * expected
    assert model.config.vocab_size % 8 == 0 and model.config.vocab_size >= 260


@pytest.mark.parametrize(
    ("size", "low", "high"),
    [("tiny", 0, 1_500_000), ("small", 15_000_000, 25_000_000), ("base", 80_000_000, 120_000_000),
     ("large", 350_000_000, 400_000_000)],
)
def test_param_counts(size, low, high):
    assert low < count_params(size) < high


def test_tiny_forward_backward():
    model = build_model("tiny")
    ids = build_tokenizer()(["sort cba =", "sort ab ="], padding=True, return_tensors="pt")
    out = model(**ids, labels=ids["input_ids"])
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert out.logits.shape[-1] == SIZES["tiny"]["vocab_size"]


# --- materialize -----------------------------------------------------------------------


def test_materialize_loads_offline_and_is_idempotent(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = materialize("tiny", tmp_path)
    assert path == tmp_path / "tiny-v1" and (path / MARKER).is_file()
    assert (path / "model.safetensors").is_file()
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert materialize("tiny", tmp_path) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-v1"]  # no temp dirs left

    loaded = AutoModelForCausalLM.from_pretrained(path)
    fresh = build_model("tiny").state_dict()
    assert all(torch.equal(v, fresh[k]) for k, v in loaded.state_dict().items())
    assert loaded.generation_config.pad_token_id == 3
    tok = AutoTokenizer.from_pretrained(path)
    assert tok("x")["input_ids"] == [1, 4 + ord("x")]
    assert tok.pad_token_id == 3 and tok.chat_template == build_tokenizer().chat_template


def test_materialize_concurrent_calls_agree(tmp_path):
    results: list = []
    threads = [
        threading.Thread(target=lambda: results.append(materialize("tiny", tmp_path)))
        for _ in range(3)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [tmp_path / "tiny-v1"] * 3
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny-v1"]


def test_materialize_replaces_incomplete_dir(tmp_path):
    (tmp_path / "tiny-v1").mkdir(parents=True)
    (tmp_path / "tiny-v1" / "junk").write_text("partial")
    path = materialize("tiny", tmp_path)
    assert (path / MARKER).is_file() and not (path / "junk").exists()


def test_materialize_rebuilds_a_cache_of_empty_weights_behind_its_marker(tmp_path):
    """What the first ZeRO-3 run on a fresh cache used to publish: every weight an empty
    partition, marker written. Loading it failed in every later run; it is rebuilt."""
    from safetensors.torch import load_file, save_file

    fresh = build_model("tiny").state_dict()
    poisoned = tmp_path / "tiny-v1"
    poisoned.mkdir()
    save_file({k: torch.empty(0) for k in fresh}, str(poisoned / "model.safetensors"))
    (poisoned / MARKER).write_text("builtin:tiny v1\n")
    path = materialize("tiny", tmp_path)
    assert path == poisoned and (path / MARKER).is_file()
    loaded = load_file(str(path / "model.safetensors"))
    assert loaded.keys() == fresh.keys() and all(torch.equal(v, fresh[k]) for k, v in loaded.items())


def test_resolve_builtin(tmp_path):
    assert resolve_builtin("gpt2") is None
    assert resolve_builtin("./builtin:tiny") is None
    path = resolve_builtin("builtin:tiny")
    assert path == tmp_path / "home" / "builtin" / "tiny-v1"
    assert path == builtin_model.default_root() / "tiny-v1"
    with pytest.raises(UserError, match="builtin:tiny, builtin:small, builtin:base, builtin:large"):
        resolve_builtin("builtin:huge")


# --- sort task -------------------------------------------------------------------------


def test_sort_rows_are_deterministic():
    for kind in ("sft", "preference", "prompts"):
        assert sort_rows(kind, "train", 50) == sort_rows(kind, "train", 50)
    assert sort_rows("sft", "train", 20) == sort_rows("sft", "train")[:20]


def test_sort_rows_shapes_and_defaults():
    assert len(sort_rows("sft", "train")) == 4000
    assert len(sort_rows("prompts", "train")) == 2000
    assert len(sort_rows("preference", "eval")) == 200
    row = sort_rows("sft", "train", 1)[0]
    letters = row["prompt"].removeprefix("sort ").removesuffix(" =")
    assert row["response"] == " " + "".join(sorted(letters))
    assert 3 <= len(letters) <= 7 and set(letters) <= set("abcdefghijkl")
    assert len(row["prompt"] + row["response"]) <= 30
    assert set(sort_rows("prompts", "eval", 1)[0]) == {"prompt"}


def test_preference_rejected_is_wrong():
    rows = sort_rows("preference", "train")
    assert all(r["rejected"] != r["chosen"] for r in rows)
    assert all(sort_exact([r["prompt"]], [r["chosen"]]) == [1.0] for r in rows)
    assert all(sort_exact([r["prompt"]], [r["rejected"]]) == [0.0] for r in rows)


def _letters(prompt: str) -> str:
    return prompt.removeprefix("sort ").removesuffix(" =")


def _is_sorted(text: str) -> bool:
    return list(text) == sorted(text)


# What each kind of wrong answer must look like, given (answer, wrong) without the space.
KIND_SHAPES = {
    "swap_adjacent": lambda a, w: sorted(w) == list(a) and len(w) == len(a),
    "shuffle": lambda a, w: sorted(w) == list(a),
    "replace_one": lambda a, w: len(w) == len(a) and sum(x != y for x, y in zip(a, w, strict=False)) == 1,
    "drop_one": lambda a, w: len(w) == len(a) - 1 and set(w) < set(a) and _is_sorted(w),
    "drop_tail": lambda a, w: a.startswith(w) and 1 <= len(a) - len(w) <= 2,
    "duplicate_one": lambda a, w: len(w) == len(a) + 1 and set(w) == set(a) and _is_sorted(w),
    "substitute_sorted": lambda a, w: len(w) == len(a) and _is_sorted(w) and 1 <= len(set(w) - set(a)) <= 2,
    "insert_foreign": lambda a, w: len(w) == len(a) + 1 and _is_sorted(w) and len(set(w) - set(a)) == 1,
    "extra_trailing": lambda a, w: w.startswith(a) and 1 <= len(w) - len(a) <= 3,
    "echo_input": lambda a, w: sorted(w) == list(a),
}


def test_every_kind_of_mistake_has_its_shape():
    assert set(MISTAKES) == set(KIND_SHAPES)
    rng = random.Random(0)
    for row in sort_rows("prompts", "train", 300):
        letters = _letters(row["prompt"])
        answer = "".join(sorted(letters))
        for kind, mistake in MISTAKES.items():
            wrong = mistake(letters, answer, rng)
            assert KIND_SHAPES[kind](answer, wrong), (kind, letters, wrong)
            assert set(wrong) <= set(LETTERS), (kind, wrong)


@pytest.mark.parametrize("split", ["train", "eval"])
def test_preference_pairs_hold_every_kind_of_mistake(split):
    """Extra letters (trailing, foreign, doubled), missing letters (anywhere, the tail),
    wrong order and wrong letters: each kind must be common, or a reward model trained on
    the pairs has no reason to rank it below the answer (and PPO finds the hole)."""
    rows = sort_rows("preference", split)
    shares = dict.fromkeys(KIND_SHAPES, 0.0)
    for row in rows:
        answer, wrong = row["chosen"][1:], row["rejected"][1:]
        assert wrong != answer
        for kind, shape in KIND_SHAPES.items():
            shares[kind] += shape(answer, wrong) / len(rows)
    # Ten kinds drawn uniformly: ~10% each (some shapes overlap, e.g. a shuffle may be a swap).
    assert all(share > 0.06 for share in shares.values()), shares
    assert shares["extra_trailing"] > 0.08 and shares["drop_tail"] > 0.08, shares


def test_eval_and_train_are_disjoint():
    kinds = ("sft", "preference", "prompts")
    train = {r["prompt"] for k in kinds for r in sort_rows(k, "train")}
    evals = {r["prompt"] for k in kinds for r in sort_rows(k, "eval")}
    assert len(evals) == 200 and not train & evals


def test_sort_reward_values():
    p = "sort dcba ="
    responses = [" abcd", " abdc", "", " abcdx", "abcd\n", " xyz!?", " dcba"]
    assert sort_reward([p] * 7, responses) == [1.0, 0.5, 0.0, 0.8, 1.0, 0.0, 0.0]
    assert sort_exact([p] * 3, [" abcd", " abdc", ""]) == [1.0, 0.0, 0.0]
    assert sort_reward(["not a sort prompt"], [" abc"]) == [0.0]


def test_builtin_rows_specs():
    assert builtin_rows("builtin:sort", "sft") == sort_rows("sft", "train")
    assert builtin_rows("builtin:sort:eval", "prompts") == sort_rows("prompts", "eval")
    assert builtin_rows("builtin:sort:train:5", "sft") == sort_rows("sft", "train", 5)
    for bad in ("builtin:nope", "builtin:sort:test", "builtin:sort:eval:x", "data.jsonl"):
        with pytest.raises(UserError):
            builtin_rows(bad, "sft")
    with pytest.raises(UserError):
        builtin_rows("builtin:sort", "pairs")


def test_reward_fn_lookup():
    assert builtin_reward_fn("sort") is sort_reward
    assert builtin_reward_fn("builtin:sort") is sort_reward
    module, name = "rlhf_cli.builtin.tasks:sort_reward".split(":")
    assert getattr(importlib.import_module(module), name) is sort_reward
    with pytest.raises(UserError):
        builtin_reward_fn("nope")
