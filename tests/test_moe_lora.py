"""`lora.target_modules: auto` on mixture-of-experts families adapts the experts, never the router.

In transformers 5 the experts of Mixtral and Qwen3-MoE are stacked 3-D parameters, not linear
layers; `auto` gives them LoRA through peft's `target_parameters` (rlhf_cli/models/lora_targets.py).
Tiny random models of tests/families.py, built locally.
"""

from __future__ import annotations

import json

import pytest
import torch
from families import build_family, save_family
from safetensors.torch import load_file
from test_families_e2e import SFT, assert_merged_equals_adapter, run_ppo, run_rm, sft_data

from rlhf_cli.models.loading import add_lora
from rlhf_cli.schema import LoraSection

MOE = ["mixtral", "qwen3_moe"]


def expert_names(model) -> set[str]:
    """Every stacked expert weight of the model (3-D parameters), as `model.layers.N.mlp.experts.X`."""
    return {name for name, param in model.named_parameters() if param.ndim == 3}


@pytest.mark.parametrize("family", MOE)
def test_auto_adapts_every_expert_weight_and_not_the_router(family, capfd, monkeypatch):
    from rlhf_cli.models import logits

    monkeypatch.setattr(logits, "_SAID", set())  # the dropout line is said once per process
    base = build_family(family)
    experts = expert_names(base)
    assert {n.rsplit(".", 2)[-2:][0] for n in experts} == {"experts"} and len(experts) == 4  # 2 layers x 2
    model = add_lora(base, LoraSection(r=4, dropout=0.05))
    assert set(model.targeted_parameter_names) == experts
    config = model.peft_config["default"]
    assert config.lora_dropout == 0.0  # peft's LoRA on parameters has no dropout: the adapter's is 0
    out = capfd.readouterr()
    assert "lora.dropout 0.05 -> 0: LoRA on the MoE experts" in out.out + out.err
    assert not config.rank_pattern  # peft's v4 -> v5 conversion (rank 2r on gate_up_proj) did not run
    for layer in model.get_base_model().model.layers:
        router = layer.mlp.gate
        assert "lora" not in type(router).__name__.lower() and not hasattr(router, "lora_A")
        assert not any(p.requires_grad for p in router.parameters())
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert sum(".experts." in n for n in trainable) == 2 * len(experts)  # lora_A and lora_B each


@pytest.mark.parametrize("family", MOE)
def test_expert_lora_disables_for_the_reference_and_takes_a_second_adapter(family):
    """What PPO's one-base arrangements need of peft's ParamWrapper: `disable_adapter()` gives
    the base's own logits (the reference), and a second adapter on the same expert parameters
    (1base-2lora's critic) is used only when active."""
    import copy

    ids = torch.randint(4, 200, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        plain = build_family(family)(ids).logits
    model = add_lora(build_family(family), LoraSection(r=4, dropout=0.0))
    model.add_adapter("critic", copy.deepcopy(model.peft_config["default"]))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and ".experts." in name:  # only the experts' LoRA is non-zero
                param.normal_(0.0, 0.1)
        policy = model(ids).logits
        with model.disable_adapter():
            torch.testing.assert_close(model(ids).logits, plain, atol=1e-5, rtol=0)
        model.set_adapter("critic")
        critic = model(ids).logits
        model.set_adapter("default")
        torch.testing.assert_close(model(ids).logits, policy, atol=0, rtol=0)
    assert (policy - plain).abs().max() > 1e-2 and (critic - policy).abs().max() > 1e-2


def test_auto_on_a_dense_family_is_unchanged():
    model = add_lora(build_family("llama"), LoraSection(r=4, dropout=0.05))
    assert model.peft_config["default"].lora_dropout == 0.05
    assert not model.peft_config["default"].target_parameters
    assert not getattr(model, "targeted_parameter_names", [])


def expert_lora(adapter_dir) -> dict[str, torch.Tensor]:
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    return {k: v for k, v in state.items() if ".experts." in k}


@pytest.mark.parametrize("family", MOE)
def test_sft_trains_the_experts_and_merge_gives_the_adapters_logits(family, in_process, tmp_path):
    """Default lora.dropout (0.05): the run goes on with dropout 0; one SFT step moves every
    expert's LoRA B (it starts at 0), the router stays the base's, and merge-lora matches."""
    base_dir = str(save_family(family, tmp_path / "base"))
    args = [*SFT, "--set", f"model.base={base_dir}", "--set", f"data.train={sft_data(tmp_path)}",
            "--set", "model.lora.dropout=0.05", "-o", "sft"]
    assert in_process(*args) == 0
    config = json.loads((tmp_path / "sft" / "final" / "adapter_config.json").read_text())
    assert config["lora_dropout"] == 0.0
    assert sorted(config["target_parameters"]) == ["experts.down_proj", "experts.gate_up_proj"]
    lora = expert_lora(tmp_path / "sft" / "final")
    lora_b = [v for k, v in lora.items() if "lora_B" in k]
    assert len(lora_b) == 4 and all(v.abs().max() > 0 for v in lora_b)  # gradients reached them
    assert in_process("merge-lora", "sft", "--out", "merged") == 0
    assert_merged_equals_adapter(tmp_path / "sft", tmp_path / "merged", base_dir, family)
    from transformers import AutoModelForCausalLM

    base = dict(AutoModelForCausalLM.from_pretrained(base_dir).named_parameters())
    merged = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").named_parameters())
    for name in expert_names(build_family(family)):
        assert (merged[name] - base[name]).abs().max() > 1e-3, name  # the experts were trained
    routers = [n for n in base if ".mlp.gate." in n]
    assert routers and all(torch.equal(merged[n], base[n]) for n in routers)  # the router was not


@pytest.mark.slow
@pytest.mark.parametrize("family", MOE)
def test_ppo_one_base_arrangements_train_the_experts(family, in_process, tmp_path):
    """PPO on a MoE base with an RM trained there: one base, the policy's (and in 1base-2lora the
    critic's) adapter on the experts, the RM's frozen adapter on the same expert parameters."""
    base_dir = str(save_family(family, tmp_path / "base"))
    run_rm(in_process, base_dir, tmp_path)
    assert len([k for k in expert_lora(tmp_path / "rm" / "final") if "lora_B" in k]) == 4
    for arrangement in ("1base-1lora", "1base-2lora"):
        run_ppo(in_process, base_dir, arrangement, tmp_path)
        lora_b = [v for k, v in expert_lora(tmp_path / arrangement / "final").items() if "lora_B" in k]
        assert len(lora_b) == 4 and all(v.abs().max() > 0 for v in lora_b), arrangement


def assert_final_loads_with_the_experts_lora(final, base_dir: str) -> None:
    """final/ loads with peft against the base it names (README, "final/"): every expert's LoRA
    is the saved one and the policy's logits differ from the base's."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    saved = expert_lora(final)
    assert json.loads((final / "adapter_config.json").read_text())["base_model_name_or_path"] == base_dir
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), final).eval()
    loaded = {n: p for n, p in model.named_parameters() if ".experts." in n and "lora_" in n}
    assert len(loaded) == len(saved) == 8  # lora_A and lora_B of 2 layers x 2 expert weights
    for name, tensor in saved.items():
        match = [p for n, p in loaded.items() if n.replace(".default", "") == name]
        assert len(match) == 1 and torch.equal(match[0].detach(), tensor), name
    ids = torch.randint(4, 200, (1, 9), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        adapted = model(ids).logits
        with model.disable_adapter():
            plain = model(ids).logits
    assert (adapted - plain).abs().max() > 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("family", MOE)
def test_ppo_two_base_and_separate_train_the_experts(family, in_process, tmp_path):
    """PPO on a MoE base in the arrangements with a second model: 2base-2lora (the RM's base,
    critic and frozen RM adapters on its experts) and separate (actor, critic from the RM
    adapter, frozen reference and the RM as a sequence classifier). The policy's expert LoRA
    trains and final/ loads with peft against the base."""
    base_dir = str(save_family(family, tmp_path / "base"))
    run_rm(in_process, base_dir, tmp_path)
    for arrangement in ("2base-2lora", "separate"):
        run_ppo(in_process, base_dir, arrangement, tmp_path)
        final = tmp_path / arrangement / "final"
        lora_b = [v for k, v in expert_lora(final).items() if "lora_B" in k]
        assert len(lora_b) == 4 and all(v.abs().max() > 0 for v in lora_b), arrangement
        assert_final_loads_with_the_experts_lora(final, base_dir)


def test_dense_layers_named_like_old_experts_are_reported(capfd):
    """A Qwen3-MoE whose first layer is a dense MLP (`mlp_only_layers`): peft's transformers-4
    mapping reads its gate/up/down_proj as expert names and gives them no LoRA; one line says so."""
    import transformers as tf
    from families import FAMILIES

    config = FAMILIES["qwen3_moe"]()
    config.mlp_only_layers = [0]
    model = add_lora(tf.AutoModelForCausalLM.from_config(config), LoraSection(r=4, dropout=0.0))
    assert set(model.targeted_parameter_names) == {"model.layers.1.mlp.experts.gate_up_proj",
                                                   "model.layers.1.mlp.experts.down_proj"}
    assert not any(".mlp." in name for name in model.targeted_module_names)  # peft dropped them
    out = capfd.readouterr()
    assert "peft maps down_proj, gate_proj, up_proj to the MoE experts of qwen3_moe" in out.out + out.err


@pytest.mark.slow
def test_qlora_on_a_moe_base_trains_the_experts_and_merges(in_process, tmp_path):
    """A 4-bit Mixtral: bitsandbytes quantizes the attention's linears, the stacked experts stay in
    model.dtype and get LoRA through peft's ParamWrapper; SFT moves them, merge-lora writes a full
    model with the adapter's logits (its own check, to 1e-3 as for every QLoRA merge), and PPO's
    1base-2lora runs on the same 4-bit base."""
    from rlhf_cli.models.quantization import QUANTIZATION_FILE, bitsandbytes_installed

    if not bitsandbytes_installed():
        pytest.skip("bitsandbytes is not installed")
    base_dir = str(save_family("mixtral", tmp_path / "base"))
    quantized = ("--set", "model.quantization=4bit", "--set", "model.dtype=bf16")
    args = [*SFT, *quantized, "--set", f"model.base={base_dir}", "--set", f"data.train={sft_data(tmp_path)}",
            "-o", "sft"]
    assert in_process(*args) == 0
    assert json.loads((tmp_path / "sft" / "final" / QUANTIZATION_FILE).read_text())["load_in_4bit"]
    lora_b = [v for k, v in expert_lora(tmp_path / "sft" / "final").items() if "lora_B" in k]
    assert len(lora_b) == 4 and all(v.abs().max() > 0 for v in lora_b)
    assert in_process("merge-lora", "sft", "--out", "merged") == 0
    from transformers import AutoModelForCausalLM

    base = dict(AutoModelForCausalLM.from_pretrained(base_dir).named_parameters())
    merged = dict(AutoModelForCausalLM.from_pretrained(tmp_path / "merged").named_parameters())
    assert merged.keys() == base.keys()  # a plain full-precision model: nothing packed, no LoRA
    assert not (tmp_path / "merged" / QUANTIZATION_FILE).exists()
    for name in expert_names(build_family("mixtral")):
        assert (merged[name] - base[name]).abs().max() > 1e-3, name
    run_rm(in_process, base_dir, tmp_path, extra=quantized)
    run_ppo(in_process, base_dir, "1base-2lora", tmp_path, extra=quantized)
    lora_b = [v for k, v in expert_lora(tmp_path / "1base-2lora" / "final").items() if "lora_B" in k]
    assert len(lora_b) == 4 and all(v.abs().max() > 0 for v in lora_b)
