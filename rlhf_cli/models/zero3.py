"""ZeRO-3 helpers: whole weights where partitioned ones cannot be used as they are.

`weights_gathered_once` serves generation (PPO's rollouts, the stages' generation-based
evaluation): sharded weights gathered once, not once per token. `gathered` serves code that
reads or writes a few weights whole (the actor EMA).
"""

from __future__ import annotations

import contextlib

from ..errors import UserError

# Marks the gathered weights as in use for the whole generation (ZeRO-3 releases only weights
# that no running module uses); a string never equals a module's integer ds_id.
_GENERATION_USE = "rlhf-generation"


def gathered(params, modifier_rank: int | None = None):
    """Whole weights inside the block, also under ZeRO-3 (collective: every process enters it).

    With `modifier_rank`, what that process writes into them is what every process holds after.
    No-op without ZeRO-3 (no weight has a `ds_id`).
    """
    sharded = [p for p in params if hasattr(p, "ds_id")]
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(sharded, modifier_rank=modifier_rank)


@contextlib.contextmanager
def weights_gathered_once(model):
    """Under ZeRO-3, all-gather a generation model's sharded weights once for a whole generate().

    Otherwise ZeRO-3's module hooks gather each layer's weights before its forward and
    release them after it: once per generated token (KV-cache decoding runs the whole model
    per token). Gathered here, the hooks find them available and, while they are marked as
    in use, do not release them. The price is one whole copy of the generation model on
    each rank during the rollout. No-op without ZeRO-3 (no weight has a `ds_id`).
    """
    params = [p for p in model.parameters() if hasattr(p, "ds_id") and not getattr(p, "ds_persist", False)]
    if not params:
        yield
        return
    with gathered(params):
        for param in params:
            param.ds_active_sub_modules.add(_GENERATION_USE)
        try:
            yield
        finally:
            for param in params:
                param.ds_active_sub_modules.discard(_GENERATION_USE)


@contextlib.contextmanager
def outside_zero3_init():
    """Build models whole, outside ZeRO-3's view (the built-in model's cache).

    While a stage-3 `HfDeepSpeedConfig` is alive (the DeepSpeed backend keeps one so that bases
    load already partitioned), transformers builds every model under `deepspeed.zero.Init`:
    each weight is then an empty partition, and the first ZeRO-3 run on a fresh cache saved
    those (a 3480-byte model.safetensors marked complete, which every later run, one process
    or several, failed to load)."""
    from transformers.integrations import deepspeed as hf_deepspeed

    ref = hf_deepspeed._hf_deepspeed_config_weak_ref  # no public getter for the object itself
    held = ref() if ref is not None else None
    if held is None:
        yield
        return
    hf_deepspeed.unset_hf_deepspeed_config()
    try:
        yield
    finally:
        hf_deepspeed.set_hf_deepspeed_config(held)


# LoRA on stacked MoE expert weights (peft's ParamWrapper, lora_targets.py) under ZeRO-3.
#
# The wrapper reads its lora_A/lora_B weights and the expert weight it adapts as tensors
# (folding the update into the weight through a parametrization), never by calling the
# modules that own them, so ZeRO-3's per-module hooks never gather them: they stay empty
# partitions ("cannot reshape tensor of 0 elements"). DeepSpeed's default leaf modules
# (zero_optimization.leaf_module: Mixtral's and Qwen2/3-MoE's sparse MoE blocks) happen to
# cover that by gathering a whole block at once, but a leaf block reduces the gradients of
# all its weights each time its backward runs: a block run twice in one forward/backward
# (1base-2lora's critic beside the actor under ZeRO-3, PPO's ptx batch beside the rollouts)
# puts each weight in DeepSpeed's reduce bucket twice (its assertion
# `len(set(p.ds_id for p in params_in_bucket)) == len(params_in_bucket)` fails). Instead the
# wrapper gathers the weights it reads (its external parameters, in DeepSpeed's terms), and
# each gradient is reduced once per backward by its own hook, however often it was used.
# A JSON that sets its own leaf_module is kept as it is, except where its leaves hold trainable
# weights and the run passes them twice in one backward: that is an `error:` line (checked
# with the model, before initialize; the recipe and JSON alone cannot tell whether a leaf class
# is in the model and holds LoRA weights). That holds on dense models too (a LLaMA's decoder
# layers as leaves), and there a leaf also needs an input that requires grad: see
# `leaf_inputs_require_grad`.


def parameter_wrappers(model) -> list:
    """peft's LoRA wrappers of expert parameters that no other wrapper holds (two adapted
    weights of one module nest: the outer wrapper's forward runs the inner one's)."""
    try:
        from peft.tuners.lora.layer import ParamWrapper
    except ImportError:  # a peft without LoRA on parameters has none
        return []
    wrappers = [m for m in model.modules() if isinstance(m, ParamWrapper)]
    inner = {id(m) for w in wrappers for m in w.base_layer.modules()}
    return [w for w in wrappers if id(w) not in inner]


def passes_twice_per_backward(recipe) -> str | None:
    """Why one backward of this run goes through the policy's blocks twice under ZeRO-3 (the
    recipe key and what runs twice), or None. Under ZeRO-3 1base-2lora's critic pass is not
    apart from the actor's (engine/deepspeed_backend.py, `passes_apart`)."""
    if recipe.stage != "ppo":
        return None  # the other stages run one forward a micro-batch (chosen and rejected together)
    if recipe.ppo.arrangement == "1base-2lora":
        return "ppo.arrangement 1base-2lora runs the critic's adapter on the actor's base beside the actor"
    if recipe.ppo.ptx_coef > 0:
        return "ppo.ptx_coef runs the SFT batch through the actor beside the rollouts"
    return None


def _entries(leaf_module: dict, key: str) -> list[str]:
    value = leaf_module.get(key) or []
    return [value] if isinstance(value, str) else [str(v) for v in value]


def _leaf_matcher(leaf_module: dict):
    """DeepSpeed's own matching (deepspeed/utils/z3_leaf_module.py): the class name or its
    dotted path, the module's name in the model, or a suffix of that name."""
    classes, names = set(_entries(leaf_module, "classes")), set(_entries(leaf_module, "names"))
    suffixes = tuple(_entries(leaf_module, "name_suffixes"))

    def is_leaf(name: str, module) -> bool:
        cls = type(module)
        return (cls.__name__ in classes or f"{cls.__module__}.{cls.__qualname__}" in classes
                or name in names or name.endswith(suffixes))

    return is_leaf


def trainable_leaf_classes(model, config: dict) -> list[str]:
    """Classes of the modules that the JSON's own `zero_optimization.leaf_module` makes ZeRO-3
    leaves and that hold trainable weights (a leaf reduces those at each run of its backward)."""
    leaf_module = config.get("zero_optimization", {}).get("leaf_module")
    if not isinstance(leaf_module, dict):
        return []
    is_leaf = _leaf_matcher(leaf_module)
    found = [type(m).__name__ for name, m in model.named_modules()
             if is_leaf(name, m) and any(p.requires_grad for p in m.parameters())]
    return sorted(set(found))


def check_leaf_modules(classes: list[str], path, twice: str | None) -> None:
    """A leaf module with trainable weights (`classes`, from `trainable_leaf_classes`) that one
    backward runs twice puts each weight in DeepSpeed's reduce bucket twice, which fails deep
    inside DeepSpeed: say so before it starts."""
    if classes and twice:
        raise UserError(f"zero_optimization.leaf_module in {path} makes {', '.join(classes)} ZeRO-3 leaf "
                        f"modules, which hold trainable weights, and {twice}: DeepSpeed would reduce "
                        "their gradients twice in one backward and fail. Remove leaf_module (ZeRO-3 "
                        "gathers each module's weights without it, and rlhf the LoRA'd MoE expert "
                        "weights with their wrappers), or list only modules without trainable weights",
                        where="launch.deepspeed")


def leaf_inputs_require_grad(model) -> None:
    """Make the outputs of the frozen embeddings require grad, for a model whose JSON's leaf
    modules hold trainable weights (LoRA in a LLaMA decoder layer made a leaf).

    DeepSpeed reduces a leaf's gradients in the leaf's full backward hook, which PyTorch runs
    once the gradients of the leaf's inputs are computed, but before the leaf's backward where
    no input requires grad: the first decoder layer's input is the output of the frozen
    embedding. There DeepSpeed reduced zero gradients for the leaf's LoRA weights and released
    them, and autograd's own gradients then met the empty partitions ("The size of tensor a (0)
    must match the size of tensor b (32)"; measured: a leaf on layers.1 alone ran, on layers.0
    failed). The extra backward is the first layer's input gradient, computed and dropped."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Embedding) and not module.weight.requires_grad:
            module.register_forward_hook(_output_requires_grad)


def _output_requires_grad(module, inputs, output):
    import torch

    if torch.is_grad_enabled():  # not in generation or the no-grad passes (reference, rollouts)
        output.requires_grad_(True)


def without_default_leaf_modules(config: dict) -> None:
    """Turn DeepSpeed's default leaf modules off, unless the JSON sets its own leaf_module."""
    config.setdefault("zero_optimization", {}).setdefault("leaf_module", {"classes": []})
    _hide_no_leaf_notice()


_NO_LEAF_NOTICE = "ZeRO leaf module configuration did not match any modules"


def _drop_no_leaf_notice(record) -> bool:
    return not record.getMessage().startswith(_NO_LEAF_NOTICE)


def _hide_no_leaf_notice() -> None:
    """DeepSpeed warns on every rank that an empty leaf_module list matched no module: that is
    what was asked for, not something for the user to act on."""
    import logging

    logger = logging.getLogger("DeepSpeed")
    if _drop_no_leaf_notice not in logger.filters:
        logger.addFilter(_drop_no_leaf_notice)


def gather_with_wrapper(wrappers) -> None:
    """Every weight under each wrapper is gathered for the wrapper's forward and backward
    (after `deepspeed.initialize`, which makes them ZeRO-3 parameters)."""
    import deepspeed

    for wrapper in wrappers:
        for param in wrapper.parameters():
            deepspeed.zero.register_external_parameter(wrapper, param)
