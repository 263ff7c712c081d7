"""Where the training loop meets the distributed runtime.

The loop only talks to a `Backend`: prepare, backward, optimizer step, save/load of the
model + optimizer state, and a few collectives. `AccelerateBackend` covers one process,
DDP on CPU (gloo) or GPUs, and mixed precision; `DeepSpeedBackend` (deepspeed_backend.py)
drives `deepspeed.initialize` directly, because accelerate's DeepSpeed plugin did not see
two ranks on CPU machines.
"""

from __future__ import annotations

import contextlib
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..schema import Recipe


def trainable_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Cloned copies of every trainable tensor (clones: a state_dict shares storage)."""
    return {
        name: param.detach().to("cpu", copy=True).contiguous()
        for name, param in model.named_parameters()
        if param.requires_grad
    }


def load_trainable_state(model: torch.nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in state]
    unknown = [n for n in state if n not in params]
    if missing or unknown:
        raise RuntimeError(f"checkpoint does not match the model: missing={missing[:3]} "
                           f"unknown={unknown[:3]}")
    with torch.no_grad():
        for name, tensor in state.items():
            params[name].copy_(tensor.to(params[name].device, params[name].dtype))


class Backend:
    """The interface the loop uses; see AccelerateBackend for the meaning of each call."""

    world_size: int = 1
    rank: int = 0
    device: torch.device
    # Whether a NaN/inf step can be left out (`skip_step`, and `optimizer_step` leaving the
    # weights alone: `skipped_step`). DeepSpeed steps inside `backward`, so it cannot.
    can_skip_steps: bool = False
    skipped_step: bool = False
    # Whether a micro-batch may run as several forward/backward passes that each reach only
    # part of the trainable weights (1base-2lora's actor, then critic: stages/ppo/update.py).
    passes_apart: bool = True

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def broadcast_object(self, obj):
        if self.world_size == 1:
            return obj
        holder = [obj]
        torch.distributed.broadcast_object_list(holder, src=0)
        return holder[0]

    def all_gather_object(self, obj) -> list:
        """Every rank's `obj`, in rank order, on every rank (pickled: small data only)."""
        if self.world_size == 1:
            return [obj]
        gathered = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, obj)
        return gathered


def average_gradients(params: list[torch.nn.Parameter], world_size: int) -> None:
    """What DDP's all-reduce does, by hand: every gradient averaged over the processes (one
    flat all-reduce per dtype; a weight without a gradient counts as zeros, as in DDP)."""
    for param in params:
        if param.grad is None:
            param.grad = torch.zeros_like(param)
    for dtype in sorted({p.grad.dtype for p in params}, key=str):
        grads = [p.grad for p in params if p.grad.dtype == dtype]
        flat = torch.cat([g.reshape(-1) for g in grads])
        torch.distributed.all_reduce(flat)
        flat /= world_size
        for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
            grad.copy_(part.view_as(grad))


class AccelerateBackend(Backend):
    can_skip_steps = True
    _average_by_hand = False  # set by `accumulating(partial=True)` until the step

    def __init__(self, recipe: Recipe):
        from accelerate import Accelerator

        launch = recipe.launch
        cpu = launch.cpu or not torch.cuda.is_available()
        self.accelerator = Accelerator(cpu=cpu, mixed_precision=launch.mixed_precision)
        self.world_size = self.accelerator.num_processes
        self.rank = self.accelerator.process_index
        self.device = self.accelerator.device
        self.max_grad_norm = recipe.train.max_grad_norm

    def prepare(self, model, optimizer):
        self.model, self.optimizer = self.accelerator.prepare(model, optimizer)
        return self.model

    def unwrap(self, model=None):
        """The module under DDP. Not accelerate's `unwrap_model`: that imports deepspeed
        whenever it is installed (22 MiB more RSS in every process), and this backend never
        makes a DeepSpeedEngine."""
        model = model if model is not None else self.model
        while isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        return model

    def autocast(self):
        return self.accelerator.autocast()

    def accumulating(self, more_to_come: bool, partial: bool = False):
        """Skip the gradient all-reduce on every micro-batch but the last of a step.

        `partial`: this backward reaches only some of the trainable weights (a micro-batch run
        in passes: 1base-2lora's actor, then critic). DDP's synchronising backward would wait
        for the weights it does not reach, so every such backward skips DDP's all-reduce and
        `optimizer_step` averages the gradients over the processes itself.
        """
        if self.world_size > 1 and (more_to_come or partial):
            self._average_by_hand = self._average_by_hand or partial
            return self.accelerator.no_sync(self.model)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor, last_pass: bool = True) -> None:
        """Accumulate the loss's gradients (`last_pass` matters to DeepSpeed only)."""
        self.accelerator.backward(loss)

    def optimizer_step(self) -> float:
        """Clip and step; NaN/inf gradients leave the weights and the optimizer state alone.

        With fp16 loss scaling an overflow is routine: the scaler skips that step and
        lowers the scale itself (it must see `step()` to do so).
        """
        params = [p for p in self.model.parameters() if p.requires_grad]
        if self._average_by_hand:
            average_gradients(params, self.world_size)
            self._average_by_hand = False
        grad_norm = float(self.accelerator.clip_grad_norm_(params, self.max_grad_norm))
        self.skipped_step = not math.isfinite(grad_norm) and self.accelerator.scaler is None
        if not self.skipped_step:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return grad_norm

    def skip_step(self) -> None:
        """Drop this step's gradients without touching weights or optimizer state."""
        self._average_by_hand = False
        self.optimizer.zero_grad(set_to_none=True)

    def full_state_dict(self, model) -> dict:
        """The whole model's state dict on the main process (for `final/`)."""
        return self.unwrap(model).state_dict()

    def save_state(self, directory: Path) -> None:
        """Model (trainable weights) and optimizer; called on every rank."""
        if self.is_main:
            save_file(trainable_state(self.unwrap()), str(directory / "trainable.safetensors"))
            # Through a Python file: a full disk then raises OSError ("No space left on
            # device") rather than torch's bare "unexpected pos".
            with open(directory / "optimizer.pt", "wb") as handle:
                torch.save(self.optimizer.state_dict(), handle)

    def load_state(self, directory: Path) -> None:
        load_trainable_state(self.unwrap(), load_file(str(directory / "trainable.safetensors")))
        state = torch.load(directory / "optimizer.pt", map_location="cpu", weights_only=True)
        self.optimizer.load_state_dict(state)


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))
