"""DeepSpeed ZeRO-2/3 through `deepspeed.initialize`, one process per rank (torchrun).

Accelerate's DeepSpeed plugin saw a world of one on CPU machines, so we drive DeepSpeed
directly; on CPUs DeepSpeed picks its CPU accelerator and gloo. The recipe fills the
config's "auto" values (micro-batch, accumulation, clipping, precision).
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import torch

from ..errors import UserError
from ..schema import Recipe
from .backend import Backend, local_rank

TAG = "deepspeed"


def _fill_auto(config: dict, key: str, value) -> None:
    if config.get(key, "auto") == "auto":
        config[key] = value


def _precision(config: dict, section: str, enabled: bool) -> None:
    block = config.setdefault(section, {})
    if block.get("enabled", "auto") == "auto":
        block["enabled"] = enabled


def deepspeed_config(recipe: Recipe, world_size: int) -> dict:
    """The user's JSON with every "auto" resolved from the recipe (pure)."""
    path = Path(recipe.launch.deepspeed)
    try:
        config = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise UserError(f"cannot read DeepSpeed config: {exc}", where="launch.deepspeed") from None
    train = recipe.train
    _fill_auto(config, "train_micro_batch_size_per_gpu", train.batch_size)
    _fill_auto(config, "gradient_accumulation_steps", train.grad_accum)
    _fill_auto(config, "gradient_clipping", train.max_grad_norm)
    _fill_auto(config, "train_batch_size", train.batch_size * train.grad_accum * world_size)
    _precision(config, "bf16", recipe.launch.mixed_precision == "bf16")
    _precision(config, "fp16", recipe.launch.mixed_precision == "fp16")
    return config


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


class DeepSpeedBackend(Backend):
    def __init__(self, recipe: Recipe):
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        deepspeed.init_distributed()
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        accelerator = get_accelerator()
        name = accelerator.device_name()
        self.device = torch.device(name if name == "cpu" else f"{name}:{local_rank()}")
        self.config = deepspeed_config(recipe, self.world_size)
        self.stage = zero_stage(self.config)
        if self.stage == 3:
            # Held alive so that from_pretrained loads weights already partitioned
            # (a 70B model never sits whole in one process).
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed = HfDeepSpeedConfig(self.config)

    def prepare(self, model, optimizer):
        import deepspeed

        self.engine, _, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=self.config
        )
        # The schedule drives the client optimizer's param groups, which ZeRO steps.
        self.optimizer = optimizer
        self.model = self.engine
        return self.engine

    def unwrap(self, model=None):
        return self.engine.module

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts weights itself

    def accumulating(self, more_to_come: bool):
        return contextlib.nullcontext()  # DeepSpeed reduces only at the boundary

    def backward(self, loss: torch.Tensor) -> None:
        # The loop already divides by the global batch weight: no extra 1/accumulation.
        self.engine.backward(loss, scale_wrt_gas=False)
        # Steps the optimizer only on the accumulation boundary (counted by DeepSpeed).
        self.engine.step()

    def optimizer_step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def full_state_dict(self, model) -> dict:
        if self.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict() or {}
        return self.engine.module.state_dict()

    def save_state(self, directory: Path) -> None:
        self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)

    def load_state(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=TAG,
                                              load_lr_scheduler_states=False)
        if path is None:
            raise UserError(f"cannot load the DeepSpeed checkpoint in {directory}")
