"""What `lora.target_modules: auto` adapts on a given model.

On a dense model `auto` is peft's "all-linear": every nn.Linear / Conv1D of the blocks,
never the output head. In transformers 5 the experts of a mixture-of-experts block are
not linear layers but stacked 3-D parameters (`experts.gate_up_proj [E, 2I, H]`,
`experts.down_proj [E, H, I]`), so "all-linear" alone would leave them frozen; peft
adapts such parameters through `LoraConfig(target_parameters=...)` (lora.ParamWrapper).

The experts are found from the model itself (a parameter with 3 dimensions on a module
that is not a linear layer), not from a list of family names. The router never gets
LoRA: it is the linear map beside the experts whose outputs are the E expert scores.

peft's ParamWrapper has no LoRA dropout (x cannot be factored out of the expert matmul)
and one adapter has one dropout: with experts adapted, the adapter's dropout is 0.
"""

from __future__ import annotations

import torch

EXPERT_PARAMETER_DIMS = 3  # [experts, out, in] (or [experts, in, out])


def _shape(param) -> torch.Size:
    # Under ZeRO-3 a partitioned parameter is empty here; DeepSpeed keeps its real shape.
    return getattr(param, "ds_shape", None) or param.shape


def _is_linear(module) -> bool:
    from transformers.pytorch_utils import Conv1D

    return isinstance(module, (torch.nn.Linear, Conv1D))


def expert_parameters(model) -> dict[str, int]:
    """`module.param` names (the expert module's last name + the parameter: what peft's
    `target_parameters` matches as a suffix) of stacked expert weights -> number of experts."""
    found: dict[str, int] = {}
    for module_name, module in model.named_modules():
        if _is_linear(module) or isinstance(module, torch.nn.Embedding):
            continue
        for param_name, param in module.named_parameters(recurse=False):
            shape = _shape(param)
            if len(shape) == EXPERT_PARAMETER_DIMS and module_name:
                found[f"{module_name.rsplit('.', 1)[-1]}.{param_name}"] = shape[0]
    return found


def _routers(model, experts: set[int]) -> set[str]:
    """Linear layers that sit beside an experts module and output one score per expert."""
    routers = set()
    for name, module in model.named_modules():
        children = dict(module.named_children())
        holds_experts = any(
            len(_shape(p)) == EXPERT_PARAMETER_DIMS
            for child in children.values() for p in child.parameters(recurse=False))
        if not holds_experts:
            continue
        for child_name, child in children.items():
            if _is_linear(child) and _shape(child.weight)[0] in experts:
                routers.add(f"{name}.{child_name}" if name else child_name)
    return routers


def _heads(model) -> set[int]:
    """ids of output heads `auto` must never adapt: the LM head, a classifier's score head."""
    heads = {id(model.get_output_embeddings())} if hasattr(model, "get_output_embeddings") else set()
    for name in ("score", "classifier", "lm_head", "embed_out"):
        if isinstance(getattr(model, name, None), torch.nn.Module):
            heads.add(id(getattr(model, name)))
    return heads


def linear_targets(model, experts: dict[str, int]) -> list[str]:
    """Leaf names of the blocks' linear layers, without heads and routers (as "all-linear")."""
    heads, routers = _heads(model), _routers(model, set(experts.values()))
    names = {name.rsplit(".", 1)[-1] for name, module in model.named_modules()
             if _is_linear(module) and id(module) not in heads and name not in routers}
    return sorted(names)


def auto_targets(model) -> tuple[list[str] | str, list[str]]:
    """(target_modules, target_parameters) for `auto` on `model`."""
    experts = expert_parameters(model) if model is not None else {}
    if not experts:
        return "all-linear", []
    return linear_targets(model, experts), sorted(experts)


def remapped_by_peft(requested: set[str] | str, config) -> list[str]:
    """Linear targets peft dropped while injecting: its transformers-4 compatibility mapping
    for MoE families (peft.utils.transformers_weight_conversion) reads names such as
    `gate_proj`/`up_proj`/`down_proj` as the old per-expert layers and turns them into expert
    parameter targets, so a dense MLP or shared expert with those names gets no LoRA."""
    if isinstance(requested, str) or not config.target_parameters:
        return []
    return sorted(set(requested) - set(config.target_modules or ()))
