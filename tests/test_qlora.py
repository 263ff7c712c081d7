"""QLoRA: `model.quantization: 4bit | 8bit` through bitsandbytes, on the CPU.

What the 4-bit base computes is pinned exactly (it equals the fp32 model rebuilt from its
dequantized weights), how far that is from the original weights is bounded by nf4's grid,
and every stage runs through the real CLI on a 4-bit base. Skipped without bitsandbytes
(`make install` installs it through the `qlora` extra, so CI runs them).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import REPO, cli_env, error_line, read_jsonl, rlhf, train_rows

from rlhf_cli.models.quantization import QUANTIZATION_FILE, bitsandbytes_installed

needs_bnb = pytest.mark.skipif(not bitsandbytes_installed(), reason="bitsandbytes is not installed "
                               "(pip install 'rlhf-cli[qlora]'; `make install` installs it)")
RECIPES = REPO / "recipes"
SFT_FAST = ["--set", "data.max_length=32", "--set", "train.batch_size=16", "--set", "train.log_every=1",
            "--set", "train.eval_reward_fn=null", "--set", "train.eval_every=null", "--set", "data.eval=null",
            "--set", "train.save_every=null"]
PPO_FAST = ["--set", "train.max_steps=2", "--set", "train.log_every=1", "--set", "train.eval_every=null",
            "--set", "train.save_every=null", "--set", "train.eval_num_prompts=16",
            "--set", "ppo.rollout_batch_size=16", "--set", "ppo.mini_batch_size=8",
            "--set", "ppo.ppo_epochs=1"]
FOUR_BIT = ["--set", "model.quantization=4bit"]
# nf4's largest gap between neighbouring levels is 1 - 0.6962 (next to ±1), so rounding moves a
# weight by at most 0.152 of its block's absmax; double quantization stores that absmax in 8
# bits, off by up to ~2% (measured: 0.1547). 0.16 leaves room for that and nothing more.
NF4_MAX_ERROR = 0.16
# Relative error of the 4-bit tiny model's logits against fp32 (|Δ| / |logits - mean|):
# measured 0.206 on these inputs (8-bit: 0.018). nf4 moves each weight by ~10% of its block's
# scale and 4 random layers compound it; a model unrelated to the base scores ~1.4.
LOGITS_REL_ERROR = 0.3
# The same for 8-bit: measured 0.018 (int8 rows, fp16 activations); 0.05 leaves ~2.5x.
LOGITS_8BIT_REL_ERROR = 0.05


def _tiny(quantization: str | None = None, dtype: str = "fp32"):
    from rlhf_cli.models.loading import load_causal_lm
    from rlhf_cli.schema import ModelSection

    return load_causal_lm(ModelSection(base="builtin:tiny", dtype=dtype, quantization=quantization))


def _ids():
    import torch

    return torch.randint(3, 259, (4, 24), generator=torch.Generator().manual_seed(0))


@needs_bnb
def test_nf4_forward_backward_trains_only_the_lora_and_disable_gives_the_base(rlhf_home):
    import bitsandbytes as bnb
    import torch

    from rlhf_cli.models.loading import add_lora, count_parameters
    from rlhf_cli.schema import LoraSection

    model = _tiny("4bit")
    assert count_parameters(model)[1] == count_parameters(_tiny())[1]  # packed weights counted in full
    layer = model.model.layers[0]
    assert isinstance(layer.mlp.down_proj, bnb.nn.Linear4bit)
    assert layer.mlp.down_proj.weight.dtype == torch.uint8
    assert model.lm_head.weight.dtype == model.model.embed_tokens.weight.dtype == torch.float32
    ids = _ids()
    with torch.no_grad():
        base_logits = model(ids).logits
    peft_model = add_lora(model, LoraSection(r=8, alpha=16, dropout=0.0))
    for module in peft_model.modules():  # a nonzero B, so the adapter changes the output
        if hasattr(module, "lora_B"):
            torch.nn.init.normal_(module.lora_B["default"].weight, std=0.05)
    peft_model.train()
    peft_model(ids, labels=ids).loss.backward()
    named = dict(peft_model.named_parameters())
    lora = {n for n in named if ".lora_" in n}
    assert lora and all(named[n].grad is not None and named[n].grad.abs().sum() > 0 for n in lora)
    assert all(p.grad is None and not p.requires_grad for n, p in named.items() if n not in lora)
    peft_model.eval()
    with torch.no_grad():
        adapted = peft_model(ids).logits
        with peft_model.disable_adapter():
            disabled = peft_model(ids).logits
    torch.testing.assert_close(disabled, base_logits, atol=1e-5, rtol=0)
    assert (adapted - base_logits).abs().max() > 1e-2


@needs_bnb
def test_4bit_base_computes_its_dequantized_weights_within_nf4_error_of_fp32(rlhf_home):
    import torch

    from rlhf_cli.models.quantization import dequantized

    reference, ids = _tiny().eval(), _ids()
    quantized = _tiny("4bit").eval()
    with torch.no_grad():
        fp32_logits, four_bit = reference(ids).logits, quantized(ids).logits
        rebuilt = dequantized(_tiny("4bit"), torch.float32).eval()
        torch.testing.assert_close(four_bit, rebuilt(ids).logits, atol=1e-4, rtol=0)
    original = reference.model.layers[1].self_attn.o_proj.weight.detach().reshape(-1, 64)
    got = rebuilt.model.layers[1].self_attn.o_proj.weight.detach().reshape(-1, 64)
    error = (got - original).abs() / original.abs().amax(dim=1, keepdim=True)
    assert 0.01 < error.mean() and error.max() <= NF4_MAX_ERROR, (error.mean(), error.max())
    centred = fp32_logits - fp32_logits.mean(-1, keepdim=True)
    relative = float((four_bit - fp32_logits).norm() / centred.norm())
    assert 0.01 < relative < LOGITS_REL_ERROR, relative


@needs_bnb
def test_8bit_base_runs_on_the_cpu_and_trains_only_the_lora(rlhf_home):
    """LLM.int8 on the CPU: bitsandbytes computes it in fp16 with outlier columns kept apart."""
    import bitsandbytes as bnb
    import torch

    from rlhf_cli.models.loading import add_lora
    from rlhf_cli.schema import LoraSection

    ids = _ids()
    with torch.no_grad():
        fp32_logits = _tiny().eval()(ids).logits
    model = _tiny("8bit")
    assert isinstance(model.model.layers[0].self_attn.q_proj, bnb.nn.Linear8bitLt)
    with torch.no_grad():
        eight_bit = model(ids).logits
    centred = fp32_logits - fp32_logits.mean(-1, keepdim=True)
    assert float((eight_bit - fp32_logits).norm() / centred.norm()) < LOGITS_8BIT_REL_ERROR
    peft_model = add_lora(model, LoraSection(r=8, alpha=16, dropout=0.0)).train()
    peft_model(ids, labels=ids).loss.backward()
    grads = {n: p.grad for n, p in peft_model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_" in n for n in grads)
    # B starts at 0 (so A's gradient is 0): every B, the first block's included, gets a gradient
    # that came back through the 8-bit layers above it.
    b_grads = [g for n, g in grads.items() if ".lora_B." in n]
    assert len(b_grads) == 4 * 7 and all(g.abs().sum() > 0 for g in b_grads)


@needs_bnb
def test_a_4bit_models_whole_state_loads_back_only_over_the_same_base(rlhf_home):
    """What resuming a DeepSpeed checkpoint (the whole module's state) does on a 4-bit base."""
    import torch

    from rlhf_cli.models.quantization import load_state_over_quantized_base, quantization_state_keys

    model, ids = _tiny("4bit").eval(), _ids()
    with torch.no_grad():
        before = model(ids).logits
    state = {key: value.clone() for key, value in model.state_dict().items()}
    extra = quantization_state_keys(model)
    assert len([key for key in extra if key.endswith(".weight.absmax")]) == 4 * 7  # every block linear
    assert not quantization_state_keys(_tiny())
    with pytest.raises(RuntimeError, match=r"Unexpected key\(s\).*weight\.absmax"):
        model.load_state_dict(state)  # torch's strict load, which DeepSpeed's resume used
    saved_norm = state["model.norm.weight"]
    state["model.norm.weight"] = saved_norm + 1.0
    load_state_over_quantized_base(model, state)
    assert torch.equal(model.model.norm.weight, state["model.norm.weight"])  # the rest is loaded
    state["model.norm.weight"] = saved_norm
    load_state_over_quantized_base(model, state)
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, before, atol=0, rtol=0)
    state[sorted(extra)[0]] = state[sorted(extra)[0]] + 1  # as if trained on another base
    with pytest.raises(ValueError, match="quantized base differs from this run's"):
        load_state_over_quantized_base(model, state)


# --------------------------------------------------------------------------- bad input


def _sft(tmp_path: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return rlhf("sft", "--recipe", str(RECIPES / "tiny-sft.yaml"), *SFT_FAST, "--set", "train.max_steps=1",
                *extra, "-o", "out", cwd=tmp_path, env=env)


def _assert_refused(proc: subprocess.CompletedProcess, tmp_path: Path, *texts: str) -> None:
    assert proc.returncode == 2, proc.stderr
    line = error_line(proc.stderr)
    assert all(text in line for text in texts), line
    assert not (tmp_path / "out").exists()


def test_unknown_quantization_is_one_error_line(rlhf_home, tmp_path):
    _assert_refused(_sft(tmp_path, "--set", "model.quantization=3bit"), tmp_path,
                    "model.quantization", "`3bit` is not one of 4bit, 8bit")


def test_quantization_without_bitsandbytes_names_the_install_command(rlhf_home, tmp_path):
    blocker = tmp_path / "blocker"
    blocker.mkdir()
    # Imported at start-up: from then on `import bitsandbytes` fails as if it were not installed.
    (blocker / "sitecustomize.py").write_text('import sys\nsys.modules["bitsandbytes"] = None\n')
    env = {"PYTHONPATH": f"{blocker}:{REPO}"}
    _assert_refused(_sft(tmp_path, *FOUR_BIT, env=env), tmp_path,
                    "model.quantization", "bitsandbytes", "pip install 'rlhf-cli[qlora]'")


def test_quantization_needs_lora(rlhf_home, tmp_path):
    _assert_refused(_sft(tmp_path, *FOUR_BIT, "--set", "model.lora=null"), tmp_path,
                    "model.quantization", "set model.lora")


@needs_bnb
def test_quantization_under_zero3_is_refused(rlhf_home, tmp_path):
    proc = _sft(tmp_path, *FOUR_BIT, "--set", f"launch.deepspeed={RECIPES / 'deepspeed' / 'zero3.json'}")
    _assert_refused(proc, tmp_path, "model.quantization", "ZeRO-3")


# ------------------------------------------------------------------- stages end to end


@pytest.fixture(scope="module")
def work(rlhf_home, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("qlora")


@pytest.fixture(scope="module")
def qlora_sft(work) -> Path:
    proc = rlhf("sft", "--recipe", str(RECIPES / "tiny-sft.yaml"), *SFT_FAST, *FOUR_BIT,
                "--set", "train.max_steps=8", "--set", "train.warmup_steps=2", "-o", "sft", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work / "sft"


@pytest.fixture(scope="module")
def qlora_rm(work) -> Path:
    proc = rlhf("rm", "--recipe", str(RECIPES / "tiny-rm.yaml"), *FOUR_BIT, "-o", "rm",
                "--set", "train.max_steps=3", "--set", "train.eval_every=null",
                "--set", "train.save_every=null", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work / "rm"


@needs_bnb
@pytest.mark.slow
def test_qlora_sft_learns_and_records_its_quantization(qlora_sft):
    losses = [row["loss"] for row in train_rows(qlora_sft)]
    assert len(losses) == 8 and all(loss == loss and abs(loss) < 1e3 for loss in losses)
    assert losses[-1] < losses[0] - 1.0, losses
    record = json.loads((qlora_sft / "final" / QUANTIZATION_FILE).read_text())
    assert record["load_in_4bit"] and record["bnb_4bit_quant_type"] == "nf4"
    assert record["bnb_4bit_use_double_quant"] and record["bnb_4bit_compute_dtype"] == "float32"


# Loads the merged directory where bitsandbytes, peft and rlhf_cli cannot be imported, and
# prints its logits for one input as JSON.
PLAIN_LOAD = """
import json, sys
for name in ("bitsandbytes", "peft", "rlhf_cli"):
    sys.modules[name] = None
import torch
from transformers import AutoModelForCausalLM
model = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
ids = torch.tensor(json.loads(sys.argv[2]))
with torch.no_grad():
    logits = model(ids).logits
print(json.dumps({"quantized": hasattr(model.config, "quantization_config"),
                  "dtype": str(model.dtype), "logits": logits.tolist()}))
"""


@needs_bnb
@pytest.mark.slow
def test_merged_qlora_model_is_dequantized_base_plus_adapter_in_plain_transformers(qlora_sft, tmp_path):
    import torch
    from peft import PeftModel

    from rlhf_cli.models.quantization import dequantized

    merged = tmp_path / "merged"
    proc = rlhf("merge-lora", str(qlora_sft), "--out", str(merged), cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert not (merged / QUANTIZATION_FILE).exists()
    ids = _ids()
    plain = subprocess.run([sys.executable, "-c", PLAIN_LOAD, str(merged), json.dumps(ids.tolist())],
                           cwd=tmp_path, env=cli_env(pythonpath=False), capture_output=True, text=True,
                           timeout=300)
    assert plain.returncode == 0, plain.stderr
    result = json.loads(plain.stdout.splitlines()[-1])
    assert not result["quantized"] and result["dtype"] == "torch.float32"
    got = torch.tensor(result["logits"])
    final = str(qlora_sft / "final")
    with torch.no_grad():
        rebuilt = dequantized(_tiny("4bit"), torch.float32)
        expected = PeftModel.from_pretrained(rebuilt, final).eval()(ids).logits
        trained_on = PeftModel.from_pretrained(_tiny("4bit"), final).eval()(ids).logits
        on_original = PeftModel.from_pretrained(_tiny(), final).eval()(ids).logits
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)
    torch.testing.assert_close(got, trained_on, atol=1e-4, rtol=0)  # what training saw
    # Merging into the original (unquantized) weights would be another model.
    assert (got - on_original).abs().max() > 0.1


@needs_bnb
@pytest.mark.slow
def test_qlora_rm_and_dpo(qlora_rm, work):
    import bitsandbytes as bnb

    from rlhf_cli.stages.evaluate.loaded import load_for_eval

    assert (qlora_rm / "final" / QUANTIZATION_FILE).is_file()
    assert all(r["loss"] == r["loss"] for r in train_rows(qlora_rm))
    # `rlhf eval` scores with the model as trained: the adapter on its 4-bit base.
    loaded = load_for_eval(str(qlora_rm))
    assert loaded.kind == "reward_model"
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in loaded.model.modules())
    proc = rlhf("dpo", "--recipe", str(RECIPES / "tiny-dpo.yaml"), *FOUR_BIT, "-o", "dpo",
                "--set", "data.train=builtin:sort:train:512", "--set", "data.eval=null",
                "--set", "data.max_length=32", "--set", "train.log_every=1", "--set", "train.max_steps=3",
                "--set", "train.eval_reward_fn=null", "--set", "train.save_every=null",
                "--set", "train.eval_every=null", cwd=work)
    assert proc.returncode == 0, proc.stderr
    losses = [r["loss"] for r in train_rows(work / "dpo")]
    assert len(losses) == 3 and abs(losses[0] - 0.6931) < 1e-3, losses  # policy == 4-bit reference


@needs_bnb
@pytest.mark.slow
@pytest.mark.parametrize("arrangement", ["1base-1lora", "1base-2lora", "2base-2lora", "separate"])
def test_qlora_ppo_with_a_qlora_reward_model(arrangement, qlora_rm, work):
    """One 4-bit base is the policy body, the reference (adapter off) and the reward body in
    the one-base arrangements; the two-base ones quantize every base they load."""
    out = f"ppo-{arrangement}"
    proc = rlhf("ppo", "--recipe", str(RECIPES / f"tiny-ppo-{arrangement}.yaml"), *PPO_FAST, *FOUR_BIT,
                "--set", "ppo.reward_fn=null", "--set", f"ppo.reward_model={qlora_rm}", "-o", out, cwd=work)
    assert proc.returncode == 0, proc.stderr
    rows = [r for r in read_jsonl(work / out / "metrics.jsonl") if r.get("split") != "eval"]
    assert [r["step"] for r in rows] == [1, 2]
    assert rows[0]["kl"] == 0.0  # the fresh adapter on the 4-bit base is its reference exactly
    assert all(r[k] == r[k] for r in rows for k in ("score", "loss", "policy_loss", "value_loss"))
    assert (work / out / "final" / QUANTIZATION_FILE).is_file()
