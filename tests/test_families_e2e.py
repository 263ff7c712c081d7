"""The family matrix end to end: every stage of the CLI on a tiny random model of each family.

For each family of tests/families.py, from a local model directory (weights + the built-in
tokenizer): `rlhf sft` with `lora.target_modules: auto` -> `rlhf merge-lora` -> the merged
directory loads with plain transformers (AutoModelForCausalLM, no peft) and gives the
logits of base + adapter (default suite); `rlhf rm`, `rlhf dpo` and `rlhf ppo` in the
`1base-1lora` and `1base-2lora` arrangements each run two steps (slow suite).

Stages run through `rlhf_cli.cli.main` in this process (the `in_process` fixture): a
one-process recipe trains in the calling process anyway, so this is the code path of the
`rlhf` command without paying an interpreter start per stage. One family also goes through
real subprocesses (`test_sft_merge_in_subprocesses_and_plain_interpreter`), merged model
loaded in an interpreter where peft and rlhf_cli cannot be imported.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import REPO, cli_env, read_jsonl, rlhf, run_in, train_rows
from families import FAMILIES, save_family

TEXTS = ["sort dbca =", "The quick brown fox jumps over the lazy dog."]
MAX_LENGTH = 32
TWO_STEPS = ["--set", "train.max_steps=2", "--set", "train.warmup_steps=0", "--set", "train.log_every=1",
             "--set", "train.eval_every=null", "--set", "train.save_every=null",
             "--set", "train.batch_size=4", "--set", f"data.max_length={MAX_LENGTH}"]
NO_EVAL = ["--set", "data.eval=null", "--set", "train.eval_reward_fn=null"]
# A larger rate than tiny-sft's, so that two steps move every family's logits well past the
# merge tolerance and the equality check below means something.
SFT = ["sft", "--recipe", str(REPO / "recipes" / "tiny-sft.yaml"), *TWO_STEPS, *NO_EVAL,
       "--set", "train.lr=2e-2", "--set", "model.lora.target_modules=auto"]
# As many SFT rows as train.batch_size: the first step's batch is all of them, in any order.
SFT_ROWS = [{"prompt": "sort dbca =", "response": " abcd"},
            {"prompt": "sort zyx =", "response": " xyz"},
            {"prompt": "Name a colour:", "response": " blue, like the sky."},
            {"prompt": "2 + 3 =", "response": " 5"}]
PPO_SMALL = ["--set", "ppo.rollout_batch_size=4", "--set", "ppo.mini_batch_size=4",
             "--set", "ppo.ppo_epochs=1", "--set", "ppo.max_new_tokens=6", "--set", "train.max_steps=2",
             "--set", "train.log_every=1", "--set", "train.eval_every=null", "--set", "train.save_every=null",
             *NO_EVAL]
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "tokenizer_config.json")


@pytest.fixture(scope="module")
def family_dirs(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("families")


@pytest.fixture
def base_dir(family_dirs, request) -> str:
    """The local model directory of the test's `family` (built once per module)."""
    family = request.getfixturevalue("family")
    path = family_dirs / family
    if not (path / "config.json").is_file():
        save_family(family, path)
    return str(path)


def assert_finite_rows(run: Path, keys: tuple[str, ...], steps: int = 2) -> list[dict]:
    rows = train_rows(run)
    assert [r["step"] for r in rows] == list(range(1, steps + 1)), rows
    for row in rows:
        for key in keys:
            assert isinstance(row.get(key), float) and math.isfinite(row[key]), (key, row)
    return rows


def assert_final_adapter(run: Path, value_head: bool = False) -> None:
    final = run / "final"
    for name in ADAPTER_FILES:
        assert (final / name).is_file(), name
    assert (final / "value_head.safetensors").is_file() == value_head


def logits_of(model, tokenizer):
    import torch

    with torch.no_grad():
        return [model(**tokenizer(text, return_tensors="pt")).logits[0] for text in TEXTS]


def assert_merged_equals_adapter(run: Path, merged: Path, base: str, family: str) -> None:
    """The merged directory, loaded as a plain transformers model, gives base + adapter's logits."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assert (merged / "config.json").is_file() and not (merged / "adapter_config.json").exists()
    tokenizer = AutoTokenizer.from_pretrained(merged)
    plain = AutoModelForCausalLM.from_pretrained(merged).eval()
    assert plain.config.model_type == FAMILIES[family]().model_type
    assert not any("lora" in name for name, _ in plain.named_parameters())
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / "final").eval()
    got, expected = logits_of(plain, tokenizer), logits_of(adapted, tokenizer)
    with adapted.disable_adapter():
        before = logits_of(adapted, tokenizer)
    for g, e, b in zip(got, expected, before, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=0)
        assert (b - e).abs().max() > 1e-2  # the adapter moved the model: the check above bites


def sft_data(tmp_path: Path) -> str:
    path = tmp_path / "sft.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in SFT_ROWS))
    return str(path)


def own_logits_loss(base: str, data: str) -> float:
    """Token-mean cross-entropy of the SFT rows under the base's own `model(...).logits`
    (the first step's loss: the LoRA update is still zero), batched as `rlhf sft` batches them."""
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM

    from rlhf_cli.data.collate import pad_batch
    from rlhf_cli.data.sft import build_sft_dataset
    from rlhf_cli.models.loading import load_tokenizer

    tokenizer = load_tokenizer(base)
    examples, _ = build_sft_dataset(read_jsonl(Path(data)), tokenizer, "plain", MAX_LENGTH, None, source=data)
    batch = pad_batch(examples, tokenizer.pad_token_id)
    model = AutoModelForCausalLM.from_pretrained(base).eval()
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return float(F.cross_entropy(logits[:, :-1][labels != -100], labels[labels != -100]))


def xfail_where(known: dict[str, str]) -> list:
    """FAMILIES as parameters, those in `known` marked xfail(strict) with their reason."""
    return [pytest.param(f, marks=pytest.mark.xfail(strict=True, reason=known[f])) if f in known else f
            for f in FAMILIES]


@pytest.mark.parametrize("family", FAMILIES)
def test_sft_first_loss_is_the_models_own(family, base_dir, in_process, tmp_path):
    data = sft_data(tmp_path)
    args = [*SFT, "--set", f"model.base={base_dir}", "--set", f"data.train={data}", "-o", "sft"]
    assert in_process(*args) == 0
    rows = assert_finite_rows(tmp_path / "sft", ("loss", "grad_norm"))
    assert abs(rows[0]["loss"] - own_logits_loss(base_dir, data)) < 1e-4, rows[0]


@pytest.mark.parametrize("family", list(FAMILIES))
def test_sft_then_merge_gives_a_plain_model_with_the_adapters_logits(family, base_dir, in_process, tmp_path):
    args = [*SFT, "--set", f"model.base={base_dir}", "--set", f"data.train={sft_data(tmp_path)}", "-o", "sft"]
    assert in_process(*args) == 0
    assert_finite_rows(tmp_path / "sft", ("loss", "grad_norm"))
    assert_final_adapter(tmp_path / "sft")
    assert in_process("merge-lora", "sft", "--out", "merged") == 0
    assert_merged_equals_adapter(tmp_path / "sft", tmp_path / "merged", base_dir, family)


def run_rm(in_process, base_dir: str, tmp_path: Path, extra: tuple[str, ...] = ()) -> None:
    # data.eval stays (a small held-out set): `rlhf rm` without one fails today (issue 11 item 9).
    args = ["rm", "--recipe", str(REPO / "recipes" / "tiny-rm.yaml"), "--set", f"model.base={base_dir}",
            *TWO_STEPS, *extra, "-o", "rm"]
    assert in_process(*args) == 0  # Cohere/Granite: the causal LM's body + our score head
    assert_finite_rows(tmp_path / "rm", ("loss", "accuracy"))
    assert_final_adapter(tmp_path / "rm")
    assert (tmp_path / "rm" / "final" / "reward_stats.json").is_file()


def run_dpo(in_process, base_dir: str, tmp_path: Path) -> None:
    args = ["dpo", "--recipe", str(REPO / "recipes" / "tiny-dpo.yaml"), "--set", f"model.base={base_dir}",
            *TWO_STEPS, *NO_EVAL, "-o", "dpo"]
    assert in_process(*args) == 0
    rows = assert_finite_rows(tmp_path / "dpo", ("loss", "rewards/margins"))
    # The first batch is scored before any update: policy == reference, so the loss is log 2.
    assert abs(rows[0]["loss"] - math.log(2)) < 1e-5, rows[0]
    assert_final_adapter(tmp_path / "dpo")


def run_ppo(in_process, base_dir: str, arrangement: str, tmp_path: Path, extra: tuple[str, ...] = ()) -> None:
    # The reward is the RM trained on this base (run_rm): a frozen adapter + head on the policy's base.
    args = ["ppo", "--recipe", str(REPO / "recipes" / f"tiny-ppo-{arrangement}.yaml"),
            "--set", f"model.base={base_dir}", "--set", "ppo.reward_fn=null",
            "--set", f"ppo.reward_model={tmp_path / 'rm'}", *PPO_SMALL, *extra, "-o", arrangement]
    assert in_process(*args) == 0
    rows = assert_finite_rows(tmp_path / arrangement,
                              ("score", "kl", "loss", "policy_loss", "value_loss", "entropy", "approx_kl"))
    # The fresh actor is the reference, and one minibatch of one epoch updates from the
    # rollout's own policy: no KL, and a ratio of exactly 1 (approx_kl 0) on the first update.
    assert rows[0]["kl"] == 0.0 and abs(rows[0]["approx_kl"]) < 1e-6, rows[0]
    assert_final_adapter(tmp_path / arrangement, value_head=True)
    samples = read_jsonl(tmp_path / arrangement / "samples.jsonl")
    assert {s["step"] for s in samples} == {1, 2}


@pytest.mark.slow
@pytest.mark.parametrize("family", list(FAMILIES))
def test_rm_dpo_and_ppo_run_a_few_steps(family, base_dir, in_process, tmp_path):
    run_rm(in_process, base_dir, tmp_path)
    run_dpo(in_process, base_dir, tmp_path)
    for arrangement in ("1base-1lora", "1base-2lora"):
        run_ppo(in_process, base_dir, arrangement, tmp_path)


# Loads a merged directory in a bare interpreter where importing peft or rlhf_cli fails and
# prints its class name and logits for TEXTS as JSON.
PLAIN_LOAD = """
import json, sys
sys.modules["peft"] = None
sys.modules["rlhf_cli"] = None
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
path, texts = sys.argv[1], json.loads(sys.argv[2])
tokenizer = AutoTokenizer.from_pretrained(path)
model = AutoModelForCausalLM.from_pretrained(path).eval()
with torch.no_grad():
    out = [model(**tokenizer(t, return_tensors="pt")).logits[0].tolist() for t in texts]
print(json.dumps({"type": type(model).__name__, "logits": out}))
"""


@pytest.mark.slow
def test_sft_merge_in_subprocesses_and_plain_interpreter(rlhf_home, tmp_path):
    """Phi-3 (fused qkv_proj / gate_up_proj) through `rlhf` subprocesses, merged model read
    back where neither peft nor rlhf_cli can be imported."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base = str(save_family("phi3", tmp_path / "phi3"))
    run, _ = run_in(tmp_path, *SFT, "--set", f"model.base={base}")
    proc = rlhf("merge-lora", str(run), "--out", "merged", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    plain = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(tmp_path / "merged"), json.dumps(TEXTS)],
                           cwd=tmp_path, env=cli_env(pythonpath=False), capture_output=True, text=True,
                           timeout=300)
    assert plain.returncode == 0, plain.stderr
    result = json.loads(plain.stdout.splitlines()[-1])
    assert result["type"] == "Phi3ForCausalLM"
    adapted = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), run / "final").eval()
    expected = logits_of(adapted, AutoTokenizer.from_pretrained(run / "final"))
    for got, want in zip(result["logits"], expected, strict=True):
        torch.testing.assert_close(torch.tensor(got), want, atol=1e-4, rtol=0)
