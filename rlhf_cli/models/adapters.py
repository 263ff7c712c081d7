"""Several LoRA adapters on one peft model, switched without disturbing training.

PPO switches between the policy, critic and reward adapters several times per step, some
of them inside the training forward; `using_adapter` changes only which adapter the LoRA
layers route through, never a parameter's `requires_grad`.

Gradient checkpointing recomputes a layer's forward during backward, when another adapter
may be active: `checkpoint_under_forward_adapter` makes the recomputation run under the
adapter that the forward used (otherwise the critic's gradients would silently come from
the policy adapter's activations).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ..errors import UserError

REWARD = "reward"
CRITIC = "critic"
POLICY = "default"
WHERE = "ppo.reward_model"


def active_adapters(peft_model) -> list[str]:
    """The adapters the layers route through now (the tuner's, which `using_adapter` switches;
    PeftModel.active_adapter keeps the name it was created with)."""
    active = peft_model.base_model.active_adapter
    return [active] if isinstance(active, str) else list(active)


def adapter_parameters(peft_model, name: str) -> list[torch.nn.Parameter]:
    """The weights of adapter `name` (peft puts its name in theirs: `...lora_A.<name>.weight`)."""
    return [param for pname, param in peft_model.named_parameters() if f".{name}." in pname]


def _tuner_layers(peft_model) -> list:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [m for m in peft_model.modules() if isinstance(m, BaseTunerLayer)]


@contextlib.contextmanager
def using_adapter(peft_model, name: str | list[str]):
    """Route every LoRA layer through adapter `name` inside the block, and back after.

    Only the routing changes. peft's `set_adapter` would also flip `requires_grad` (active
    adapter trainable, the others frozen); flipping a trainable leaf's flag inside a training
    forward loses DeepSpeed ZeRO's gradient hooks on it, so it is never done here.
    """
    tuner = peft_model.base_model
    layers = _tuner_layers(peft_model)
    names = [name] if isinstance(name, str) else list(name)
    unknown = [n for n in names if n not in peft_model.peft_config]
    if unknown:
        raise KeyError(f"no adapter {unknown} (have {sorted(peft_model.peft_config)})")
    previous_model, previous = tuner.active_adapter, [layer._active_adapter for layer in layers]
    for layer in layers:
        layer._active_adapter = names
    tuner.active_adapter = names
    try:
        yield
    finally:
        for layer, adapters in zip(layers, previous, strict=True):
            layer._active_adapter = adapters
        tuner.active_adapter = previous_model


@contextlib.contextmanager
def adapters_disabled(peft_model):
    """The base model exactly (peft's `disable_adapter`), with every `requires_grad` flag kept.

    On the way out peft re-activates the active adapter and freezes all the others, which
    would silently stop training a second (critic) adapter after the first reference pass.
    """
    flags = {p: p.requires_grad for p in peft_model.parameters()}
    try:
        with peft_model.disable_adapter():
            yield
    finally:
        for param, flag in flags.items():
            param.requires_grad_(flag)


def checkpoint_under_forward_adapter(peft_model) -> None:
    """Re-enable non-reentrant checkpointing with a recompute context that switches adapters."""
    lm = peft_model.get_base_model()
    if not any(getattr(m, "gradient_checkpointing", False) is True for m in lm.modules()):
        return

    def context_fn():
        active = active_adapters(peft_model)  # read when the checkpointed forward runs
        return contextlib.nullcontext(), using_adapter(peft_model, active)

    kwargs = {"use_reentrant": False, "context_fn": context_fn}
    if hasattr(lm, "activation_checkpointing_enable"):
        lm.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        lm.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


# ------------------------------------------------------------------ reward models on disk


def reward_model_dir(source: str) -> tuple[Path, str]:
    """(directory, kind) of an RM run or model: kind `adapter` (SEQ_CLS LoRA) or `full`."""
    path = Path(source).expanduser()
    if not path.exists():
        raise UserError(f"reward model not found: {source}", where=WHERE)
    for candidate in (path / "final", path):
        if (candidate / "adapter_config.json").is_file():
            config = json.loads((candidate / "adapter_config.json").read_text())
            if config.get("task_type") != "SEQ_CLS":
                raise UserError(f"{source} is not a reward-model adapter (its task is "
                                f"{config.get('task_type')}, not SEQ_CLS)", where=WHERE)
            return candidate, "adapter"
        if (candidate / "config.json").is_file():
            config = json.loads((candidate / "config.json").read_text())
            if not any(a.endswith("ForSequenceClassification") for a in config.get("architectures") or []):
                raise UserError(f"{source} is not a reward model (architectures "
                                f"{config.get('architectures')})", where=WHERE)
            return candidate, "full"
    raise UserError(f"{source} holds no reward model (no final/adapter_config.json or config.json)",
                    where=WHERE)


def adapter_base(adapter_dir: Path) -> str:
    return json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]


def same_base(adapter_dir: Path, base_path: str) -> bool:
    named = adapter_base(adapter_dir)
    try:
        return Path(named).resolve() == Path(base_path).resolve()
    except OSError:
        return named == base_path


def split_rm_state(adapter_dir: Path) -> tuple[dict, torch.Tensor]:
    """(LoRA weights keyed as peft saves them, the score head's weight [1, H])."""
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    head = [k for k in state if ".score." in f".{k}" or k.endswith("score.weight")]
    if len(head) != 1:
        raise UserError(f"{adapter_dir}: expected one score head in the adapter, found {head}", where=WHERE)
    weight = state.pop(head[0])
    return state, weight


def _rm_lora_config(adapter_dir: Path, task_type, trainable: bool):
    from peft import LoraConfig

    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.modules_to_save = None  # the head lives outside peft here
    config.task_type = task_type
    config.inference_mode = not trainable
    return config


def _load_rm_lora(peft_model, adapter_dir: Path, name: str, trainable: bool) -> torch.Tensor:
    from peft import set_peft_model_state_dict

    lora_state, head = split_rm_state(adapter_dir)
    result = set_peft_model_state_dict(peft_model, lora_state, adapter_name=name)
    unused = [k for k in result.unexpected_keys if "lora_" in k]
    if unused:
        raise UserError(f"{adapter_dir}: adapter weights do not fit this base ({unused[:2]})", where=WHERE)
    for param in adapter_parameters(peft_model, name):
        param.requires_grad_(trainable)
    return head


def add_rm_adapter(peft_model, adapter_dir: Path, name: str, *, trainable: bool = False) -> torch.Tensor:
    """Load an RM adapter's LoRA weights as adapter `name`; returns its score head weight."""
    task_type = next(iter(peft_model.peft_config.values())).task_type
    config = _rm_lora_config(adapter_dir, task_type, trainable)
    peft_model.add_adapter(name, config)
    return _load_rm_lora(peft_model, adapter_dir, name, trainable)


def peft_with_rm_adapter(body, adapter_dir: Path, name: str, *, trainable: bool):
    """`body` wrapped by peft with the RM's LoRA as its first adapter `name`; (model, head weight)."""
    from peft import get_peft_model

    model = get_peft_model(body, _rm_lora_config(adapter_dir, "CAUSAL_LM", trainable), adapter_name=name)
    for param in model.parameters():
        param.requires_grad_(False)
    return model, _load_rm_lora(model, adapter_dir, name, trainable)
