"""The DeepSpeed backend's prepare() under ZeRO-3, with DeepSpeed itself made a no-op: LoRA on MoE
experts gathered by peft's wrappers (models/zero3.py), DeepSpeed's default leaf modules turned
off, and a JSON's own leaf modules (kept, refused where a run passes them twice in one backward,
the first layer's input made to require grad). The 2-process runs behind these rules are in
test_distributed_moe.py and test_distributed.py.
"""

from __future__ import annotations

import pytest
import torch
from cli_helpers import REPO

MIXTRAL_BLOCK = "transformers.models.mixtral.modeling_mixtral.MixtralSparseMoeBlock"


@pytest.fixture
def registered(monkeypatch) -> dict[int, set[int]]:
    """DeepSpeed made a no-op around the backend's prepare(): initialize does nothing, and the
    weights registered with each module (as external parameters) are recorded here."""
    import deepspeed

    class Engine:
        basic_optimizer = module = None

    weights: dict[int, set[int]] = {}
    monkeypatch.setattr(deepspeed, "initialize", lambda **kwargs: (Engine(), None, None, None))
    monkeypatch.setattr(deepspeed.zero, "register_external_parameter",
                        lambda module, param: weights.setdefault(id(module), set()).add(id(param)))
    return weights


@pytest.fixture
def prepare(registered):
    """The DeepSpeed backend's prepare() on `model` at a ZeRO stage with the JSON's
    zero_optimization `zero` (file ds.json), in a run that passes blocks `twice`; returns what
    it leaves of zero_optimization."""
    from rlhf_cli.engine.deepspeed_backend import DeepSpeedBackend

    def run(model, stage: int, zero: dict | None = None, twice: str | None = None) -> dict:
        backend = object.__new__(DeepSpeedBackend)
        backend.stage, backend.config = stage, {"zero_optimization": {"stage": stage, **(zero or {})}}
        backend.config_path, backend.twice = "ds.json", twice
        backend.prepare(model, torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))]))
        return backend.config["zero_optimization"]

    return run


def test_the_backend_gathers_expert_lora_with_its_wrapper(prepare, registered):
    """Under ZeRO-3, before initialize: DeepSpeed's default leaf modules off (a JSON's own
    leaf_module kept, or an error where it holds trainable weights that the run passes twice)
    and its notice that the empty list matched nothing hidden; after: every
    weight under each outermost wrapper (the expert weights and every adapter's lora_A/B)
    registered with it. Nothing changes on a dense model or ZeRO-2."""
    import logging

    from families import build_family

    from rlhf_cli.errors import UserError
    from rlhf_cli.models.loading import add_lora
    from rlhf_cli.schema import LoraSection

    moe = add_lora(build_family("mixtral"), LoraSection(r=4, dropout=0.0))
    assert prepare(moe, 3)["leaf_module"] == {"classes": []}
    notice = "ZeRO leaf module configuration did not match any modules; hooks will be applied as usual"
    assert not logging.getLogger("DeepSpeed").filter(logging.makeLogRecord({"msg": notice}))  # asked for
    experts = [layer.mlp.experts for layer in moe.get_base_model().model.layers]
    assert {id(m) for m in experts} == set(registered)  # the outer wrapper of each layer
    for outer in experts:
        assert registered[id(outer)] == {id(p) for p in outer.parameters()}
        assert len(registered[id(outer)]) == 2 + 2 * 2  # gate_up_proj, down_proj, their lora_A/B
    registered.clear()
    own = {"classes": [MIXTRAL_BLOCK]}
    assert prepare(moe, 3, {"leaf_module": own})["leaf_module"] == own
    registered.clear()
    for leaf_module in (own, {"classes": "MixtralSparseMoeBlock"}, {"name_suffixes": ["mlp"]},
                        {"names": ["base_model.model.model.layers.1.mlp"]}):
        with pytest.raises(UserError, match=r"^launch.deepspeed: zero_optimization.leaf_module in "
                                            r"ds.json makes MixtralSparseMoeBlock ZeRO-3 leaf modules"
                                            r".*, and twice: "):
            prepare(moe, 3, {"leaf_module": leaf_module}, twice="twice")
    assert not registered
    # Leaves without trainable weights reduce nothing: the routers, a class the model lacks.
    for leaf_module in ({"name_suffixes": ["mlp.gate"]}, {"classes": ["Qwen3MoeSparseMoeBlock"]}):
        assert prepare(moe, 3, {"leaf_module": leaf_module}, twice="twice")["leaf_module"] == leaf_module
        registered.clear()
    assert "leaf_module" not in prepare(moe, 2) and not registered
    dense = add_lora(build_family("llama"), LoraSection(r=4, dropout=0.0))
    assert "leaf_module" not in prepare(dense, 3) and not registered


def test_leaves_with_lora_on_a_dense_model(prepare):
    """A JSON's leaf_module making leaves of LoRA'd LLaMA decoder layers under ZeRO-3: the first
    layer's input (the frozen embedding's output) requires grad where gradients are computed, or
    DeepSpeed reduces that leaf's gradients before its backward (2 processes failed with "The size
    of tensor a (0) must match the size of tensor b (32)"); refused where a run passes the layers
    twice (measured: PPO 1base-2lora and ptx failed with DeepSpeed's reduce-bucket assertion). A
    leaf without LoRA (the MLP, LoRA on attention only) changes nothing (1base-2lora with ptx ran)."""
    from families import build_family

    from rlhf_cli.errors import UserError
    from rlhf_cli.models.loading import add_lora
    from rlhf_cli.schema import LoraSection

    def first_layer_inputs(model) -> list[bool]:
        """Whether layer 0's input requires grad: in a forward with grad, then without."""
        seen = []
        layer = model.get_base_model().model.layers[0]
        hook = layer.register_forward_pre_hook(lambda module, args: seen.append(args[0].requires_grad))
        ids = torch.tensor([[1, 2, 3]])
        model(ids)
        with torch.no_grad():
            model(ids)
        hook.remove()
        return seen

    dense = add_lora(build_family("llama"), LoraSection(r=4, dropout=0.0))
    layers = {"classes": ["LlamaDecoderLayer"]}
    with pytest.raises(UserError, match=r"^launch.deepspeed: zero_optimization.leaf_module in ds.json "
                                        r"makes LlamaDecoderLayer ZeRO-3 leaf modules.*, and twice: "):
        prepare(dense, 3, {"leaf_module": layers}, twice="twice")
    assert first_layer_inputs(dense) == [False, False]
    assert prepare(dense, 3, {"leaf_module": layers})["leaf_module"] == layers
    assert first_layer_inputs(dense) == [True, False]

    attention_only = add_lora(build_family("llama"), LoraSection(r=4, dropout=0.0,
                                                                 target_modules=["q_proj", "v_proj"]))
    mlp = {"classes": ["LlamaMLP"]}
    assert prepare(attention_only, 3, {"leaf_module": mlp}, twice="twice")["leaf_module"] == mlp
    assert first_layer_inputs(attention_only) == [False, False]


def test_only_ppo_with_the_critic_beside_the_actor_or_ptx_passes_a_block_twice():
    """What a JSON leaf_module is refused for; measured on tiny Mixtral with expert LoRA and the MoE
    block as leaf, 2 processes: SFT, DPO, PPO 1base-1lora and 2base-2lora ran, the others failed."""
    from rlhf_cli.config import load_recipe
    from rlhf_cli.models.zero3 import passes_twice_per_backward

    def twice(recipe: str, *settings: str) -> str | None:
        return passes_twice_per_backward(load_recipe(REPO / "recipes" / recipe, list(settings)))

    for recipe in ("tiny-sft.yaml", "tiny-dpo.yaml", "tiny-ppo-1base-1lora.yaml",
                   "tiny-ppo-2base-2lora.yaml"):
        assert twice(recipe) is None, recipe
    assert twice("tiny-ppo-1base-2lora.yaml").startswith("ppo.arrangement 1base-2lora runs the critic")
    assert twice("tiny-ppo-1base-1lora.yaml", "ppo.ptx_coef=0.1", "ppo.ptx_data=builtin:sort").startswith(
        "ppo.ptx_coef runs the SFT batch")
