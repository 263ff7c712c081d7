"""Several LoRA adapters on one peft model, switched without disturbing training.

peft's `set_adapter` also flips `requires_grad` (the active adapter becomes trainable,
the others frozen). PPO switches between the policy, critic and reward adapters many times
per step, so `using_adapter` restores every flag on the way out.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from ...errors import UserError

REWARD = "reward"
CRITIC = "critic"
POLICY = "default"


@contextlib.contextmanager
def using_adapter(peft_model, name: str):
    flags = {p: p.requires_grad for p in peft_model.parameters()}
    previous = peft_model.active_adapter
    peft_model.base_model.set_adapter(name)
    try:
        yield
    finally:
        peft_model.base_model.set_adapter(previous)
        for param, flag in flags.items():
            param.requires_grad_(flag)


def rm_adapter_dir(source: str) -> Path:
    """The RM adapter directory of an RM run (or the adapter dir itself)."""
    path = Path(source).expanduser()
    for candidate in (path / "final", path):
        if (candidate / "adapter_config.json").is_file():
            config = json.loads((candidate / "adapter_config.json").read_text())
            if config.get("task_type") != "SEQ_CLS":
                raise UserError(f"{source} is not a reward-model adapter (task {config.get('task_type')})",
                                where="ppo.reward_model")
            return candidate
    raise UserError(f"{source} has no reward-model adapter (final/adapter_config.json); one-base "
                    "arrangements need an RM trained with LoRA on the policy's base",
                    where="ppo.reward_model")


def same_base(adapter_dir: Path, base_path: str) -> bool:
    named = json.loads((adapter_dir / "adapter_config.json").read_text())["base_model_name_or_path"]
    try:
        return Path(named).resolve() == Path(base_path).resolve()
    except OSError:
        return named == base_path


def split_rm_state(adapter_dir: Path) -> tuple[dict, torch.Tensor]:
    """(LoRA weights keyed as peft saves them, the score head's weight [1, H])."""
    state = load_file(str(adapter_dir / "adapter_model.safetensors"))
    head = [k for k in state if ".score." in f".{k}" or k.endswith("score.weight")]
    if len(head) != 1:
        raise UserError(f"{adapter_dir}: expected one score head in the adapter, found {head}")
    weight = state.pop(head[0])
    return state, weight


def add_frozen_adapter(peft_model, adapter_dir: Path, name: str, *, trainable: bool = False) -> torch.Tensor:
    """Load an RM adapter's LoRA weights as adapter `name`; returns its score head weight."""
    from peft import LoraConfig, set_peft_model_state_dict

    config = LoraConfig.from_pretrained(str(adapter_dir))
    config.modules_to_save = None  # the head lives outside peft here
    config.task_type = peft_model.peft_config[POLICY].task_type
    config.inference_mode = not trainable
    peft_model.add_adapter(name, config)
    lora_state, head = split_rm_state(adapter_dir)
    result = set_peft_model_state_dict(peft_model, lora_state, adapter_name=name)
    missing = [k for k in result.unexpected_keys if "lora_" in k]
    if missing:
        raise UserError(f"{adapter_dir}: adapter weights do not fit this base ({missing[:2]})")
    for pname, param in peft_model.named_parameters():
        if f".{name}." in pname:
            param.requires_grad_(trainable)
    return head
