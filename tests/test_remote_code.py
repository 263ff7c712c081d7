"""Models that bring their own code (Baichuan, Baichuan 2): `model.trust_remote_code: true`.

tests/remote_code/ holds MiniBaichuan, a small Baichuan-2-style model written for these tests
(fused `W_pack` QKV, RMSNorm, rotary positions, SwiGLU, and a NormHead that normalises its
weight rows before the matmul). Each test writes it beside random weights into a directory
whose config.json has an `auto_map`, with the built-in tokenizer, and loads it as users load
Baichuan: from a local directory, offline, running the directory's own code.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from cli_helpers import REPO, error_line, read_jsonl, rlhf, run_in, train_rows

CODE = Path(__file__).parent / "remote_code"
SIZE = {"vocab_size": 264, "hidden_size": 64, "intermediate_size": 160, "num_hidden_layers": 2,
        "num_attention_heads": 4}
AUTO_MAP = {"AutoConfig": "configuration_minibaichuan.MiniBaichuanConfig",
            "AutoModelForCausalLM": "modeling_minibaichuan.MiniBaichuanForCausalLM"}
TRUST = ["--set", "model.trust_remote_code=true"]
QUICK = ["--set", "train.log_every=1", "--set", "train.eval_every=null", "--set", "train.save_every=null",
         "--set", "train.batch_size=4"]
PPO_QUICK = [*QUICK, "--set", "train.max_steps=2", "--set", "ppo.rollout_batch_size=8",
             "--set", "ppo.mini_batch_size=4", "--set", "ppo.ppo_epochs=1", "--set", "ppo.reward_fn=null"]


def write_minibaichuan(path: Path, seed: int = 0) -> Path:
    """The model code, config.json with its auto_map, random weights and the built-in tokenizer."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from rlhf_cli.builtin.tokenizer import build_tokenizer

    path.mkdir(parents=True)
    for code in CODE.glob("*_minibaichuan.py"):
        shutil.copy(code, path / code.name)
    config = {"model_type": "minibaichuan", "architectures": ["MiniBaichuanForCausalLM"],
              "auto_map": AUTO_MAP, **SIZE}
    (path / "config.json").write_text(json.dumps(config))
    config = AutoConfig.from_pretrained(path, trust_remote_code=True)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=True)
    model.save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def baichuan(tmp_path_factory) -> Path:
    return write_minibaichuan(tmp_path_factory.mktemp("remote_code") / "minibaichuan")


def _recipe(name: str, base: Path, *overrides: str):
    from rlhf_cli.config import load_recipe

    return load_recipe(REPO / "recipes" / name, [f"model.base={base}", *overrides])


def _greedy_without_cache(lm, ids: list[int], steps: int) -> list[int]:
    seq = torch.tensor([ids])
    for _ in range(steps):
        seq = torch.cat([seq, lm(seq, use_cache=False).logits[:, -1:].argmax(-1)], dim=1)
    return seq[0, len(ids):].tolist()


@torch.no_grad()
def test_remote_code_model_loads_and_its_normhead_logits_are_what_every_path_uses(baichuan):
    from rlhf_cli.engine.sampling import generate
    from rlhf_cli.models.heads import token_logprobs_and_entropy
    from rlhf_cli.models.lm_forward import position_ids_from, sequence_logprobs
    from rlhf_cli.models.loading import add_lora, load_causal_lm
    from rlhf_cli.models.policy import tokenizer_for

    recipe = _recipe("tiny-sft.yaml", baichuan, "model.trust_remote_code=true")
    lm = load_causal_lm(recipe.model).eval()
    assert lm.is_remote_code() and type(lm.get_output_embeddings()).__name__ == "NormHead"
    rows = [list(range(40, 45)), list(range(60, 68))]
    ids, mask = torch.zeros(2, 8, dtype=torch.long), torch.zeros(2, 8, dtype=torch.long)
    for row, tokens in enumerate(rows):  # left padding, as PPO samples
        ids[row, 8 - len(tokens):], mask[row, 8 - len(tokens):] = torch.tensor(tokens), 1
    out = lm(ids, attention_mask=mask, position_ids=position_ids_from(mask), use_cache=False)
    hidden = lm.model(ids, attention_mask=mask, position_ids=position_ids_from(mask),
                      use_cache=False).last_hidden_state
    weight = lm.lm_head.weight
    torch.testing.assert_close(out.logits, hidden @ F.normalize(weight, dim=-1).T)
    assert (out.logits - hidden @ weight.T).abs().max() > 0.5  # the head really normalises
    alone = lm(torch.tensor([rows[0]]), use_cache=False).logits
    torch.testing.assert_close(out.logits[0, 3:], alone[0], atol=1e-5, rtol=0)
    # rlhf's log-prob path on the padded batch equals log_softmax of the model's own logits.
    labels = torch.where(mask.bool(), ids, -100)
    logps, _ = sequence_logprobs(lm, ids, mask, labels)
    own = torch.log_softmax(out.logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None])[..., 0]
    torch.testing.assert_close(logps, (own * mask[:, 1:]).sum(1), atol=1e-4, rtol=0)
    ppo_logps, _ = token_logprobs_and_entropy(lm, hidden[:, :-1], ids[:, 1:], 1.0, False)  # PPO's path
    torch.testing.assert_close(ppo_logps[mask[:, 1:].bool()], own[mask[:, 1:].bool()], atol=1e-4, rtol=0)
    # generate() with a KV cache on left-padded prompts: what each prompt alone gives, step by step.
    tokenizer = tokenizer_for(recipe)
    sampled = generate(lm, rows, tokenizer, max_new_tokens=5)
    for tokens, got in zip(rows, sampled, strict=True):
        want = _greedy_without_cache(lm, tokens, 5)
        assert got == want[:len(got)] and (len(got) == 5 or want[len(got)] == tokenizer.eos_token_id)
    # `target_modules: auto` adapts the fused W_pack, never the NormHead.
    targets = add_lora(lm, recipe.model.lora).peft_config["default"].target_modules
    assert {"W_pack", "o_proj", "gate_proj", "up_proj", "down_proj"} <= {t.split(".")[-1] for t in targets}
    assert not any("lm_head" in t for t in targets)


@pytest.mark.parametrize("stage, recipe", [
    ("sft", "tiny-sft.yaml"), ("rm", "tiny-rm.yaml"), ("ppo", "tiny-ppo-1base-1lora.yaml"),
    ("dpo", "tiny-dpo.yaml"),
])
def test_without_the_flag_one_error_line_names_the_key(baichuan, in_process, tmp_path, capsys, stage, recipe):
    code = in_process(stage, "--recipe", str(REPO / "recipes" / recipe), "--set", f"model.base={baichuan}",
                      "-o", "run")
    assert code == 2
    error = error_line(capsys.readouterr().err)
    assert "model.trust_remote_code" in error and str(baichuan) in error, error
    assert not (tmp_path / "run").exists()


def test_an_rm_base_named_by_an_adapter_is_checked_too(baichuan):
    from rlhf_cli.errors import UserError
    from rlhf_cli.models.loading import load_causal_lm

    recipe = _recipe("tiny-rm.yaml", "builtin:tiny")  # a recipe that does not trust remote code
    with pytest.raises(UserError, match="model.trust_remote_code"):
        load_causal_lm(recipe.model, source=str(baichuan))


def test_transformers_own_refusal_names_the_key_too(baichuan, monkeypatch):
    """Where our check cannot read the config (a hub model not cached yet), transformers refuses
    while loading; that refusal is the same one-line error."""
    from rlhf_cli.errors import UserError
    from rlhf_cli.models import loading

    monkeypatch.setattr(loading, "check_trust", lambda *args, **kwargs: None)
    recipe = _recipe("tiny-sft.yaml", baichuan)
    with pytest.raises(UserError, match="model.trust_remote_code") as caught:
        loading.load_causal_lm(recipe.model)
    assert "\n" not in str(caught.value)


def test_sft_step_and_reward_model_on_a_remote_code_base(baichuan, in_process, tmp_path):
    """One SFT step through the CLI, and the RM body: the model's code has no
    sequence-classification class, so the RM is its causal LM's body with our score head."""
    from rlhf_cli.models.policy import tokenizer_for
    from rlhf_cli.models.reward import score_sequences
    from rlhf_cli.stages.rm import reward_model

    code = in_process("sft", "--recipe", str(REPO / "recipes" / "tiny-sft.yaml"), "--set",
                      f"model.base={baichuan}", *TRUST, *QUICK, "--set", "train.max_steps=1", "-o", "run")
    assert code == 0
    assert math.isfinite(train_rows(tmp_path / "run")[0]["loss"])
    adapter = json.loads((tmp_path / "run" / "final" / "adapter_config.json").read_text())
    assert "model.layers.0.self_attn.W_pack" in adapter["target_modules"]

    recipe = _recipe("tiny-rm.yaml", baichuan, "model.trust_remote_code=true")
    tokenizer = tokenizer_for(recipe)
    rm = reward_model(recipe, tokenizer, announce=False)
    trainable = {n for n, p in rm.named_parameters() if p.requires_grad and "lora_" not in n}
    assert trainable == {"base_model.model.score.modules_to_save.default.weight"}
    ids = torch.tensor([[40, 41, 42, 2, 0], [50, 51, 52, 53, 2]])
    mask = torch.tensor([[1, 1, 1, 1, 0], [1, 1, 1, 1, 1]])
    with torch.no_grad():
        hidden = rm.get_base_model().model(ids, attention_mask=mask, use_cache=False).last_hidden_state
        want = rm.get_base_model().score(hidden[[0, 1], [3, 4]]).squeeze(-1)
        torch.testing.assert_close(score_sequences(rm, ids, mask), want)
        torch.testing.assert_close(rm(input_ids=ids, attention_mask=mask).logits[:, 0], want)


def _peft_logits(base: Path, adapter: Path, ids) -> tuple[torch.Tensor, torch.Tensor]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    lm = AutoModelForCausalLM.from_pretrained(base, trust_remote_code=True, dtype=torch.float32)
    with torch.no_grad():
        plain = lm(ids, use_cache=False).logits
        adapted = PeftModel.from_pretrained(lm, str(adapter)).eval()(input_ids=ids, use_cache=False).logits
    return plain, adapted


def _run(tmp_path: Path, stage: str, recipe: str, *args: str, name: str | None = None) -> Path:
    """`rlhf STAGE --recipe recipes/RECIPE ARGS` in a fresh interpreter; its run directory."""
    work = tmp_path / (name or stage)
    work.mkdir()
    return run_in(work, stage, "--recipe", str(REPO / "recipes" / recipe), *args)[0]


@pytest.mark.slow
def test_sft_merge_rm_dpo_ppo_chain_on_a_remote_code_model(baichuan, rlhf_home, tmp_path):
    from transformers import AutoModelForCausalLM

    sft = _run(tmp_path, "sft", "tiny-sft.yaml", "--set", f"model.base={baichuan}", *TRUST, *QUICK,
               "--set", "train.max_steps=3")
    merged = tmp_path / "merged"
    proc = rlhf("merge-lora", str(sft), "--out", str(merged), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    # The merged directory carries the code and its auto_map, and loads with plain transformers.
    assert {"modeling_minibaichuan.py", "configuration_minibaichuan.py"} <= {p.name for p in merged.iterdir()}
    assert json.loads((merged / "config.json").read_text())["auto_map"] == AUTO_MAP
    ids = torch.tensor([[1, 40, 41, 42, 43, 44, 45]])
    plain, adapted = _peft_logits(baichuan, sft / "final", ids)
    with torch.no_grad():
        merged_lm = AutoModelForCausalLM.from_pretrained(merged, trust_remote_code=True)
        got = merged_lm(ids, use_cache=False).logits
    torch.testing.assert_close(got, adapted, atol=1e-4, rtol=0)
    assert (adapted - plain).abs().max() > 1e-3  # the adapter trained: the check can tell

    on_merged = ["--set", f"model.base={merged}", *TRUST, *QUICK]
    rm = _run(tmp_path, "rm", "tiny-rm.yaml", *on_merged, "--set", "train.max_steps=2")
    assert (rm / "final" / "reward_stats.json").is_file()
    proc = rlhf("merge-lora", str(rm), "--out", str(tmp_path / "rm-merged"), cwd=tmp_path)
    assert proc.returncode == 2 and "sequence-classification" in error_line(proc.stderr)
    proc = rlhf("eval", "--model", str(rm), "--data", "builtin:sort:eval", "--out", str(tmp_path / "e.json"),
                cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((tmp_path / "e.json").read_text())["num_pairs"] == 200

    dpo = _run(tmp_path, "dpo", "tiny-dpo.yaml", *on_merged, "--set", "train.max_steps=2")
    assert train_rows(dpo)[0]["loss"] == pytest.approx(math.log(2), abs=1e-5)  # actor == reference

    for arrangement in ("1base-1lora", "separate"):  # RM adapter on the causal LM; RM as its own model
        ppo = _run(tmp_path, "ppo", f"tiny-ppo-{arrangement}.yaml", *on_merged, *PPO_QUICK,
                   "--set", f"ppo.reward_model={rm}", name=arrangement)
        rows = [r for r in read_jsonl(ppo / "metrics.jsonl") if r.get("split") != "eval"]
        assert rows[0]["kl"] == 0 and all(math.isfinite(r["score"]) for r in rows), rows
        assert (ppo / "final" / "adapter_config.json").is_file()
