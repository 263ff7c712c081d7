"""An exponential moving average of the actor's trainable weights (`ppo.ema_decay`).

After every applied optimizer step: ema ← decay·ema + (1 − decay)·θ, for the policy's
trainable weights only (its LoRA adapter; never the value head or a critic adapter). It
starts equal to the actor (a fresh LoRA: B = 0) and is kept in float32 beside the model.
`final/` holds the EMA policy (what OpenRLHF's --enable_ema saves for inference) and
`final-online/` the last online weights; evaluations during the run score the EMA policy.
Checkpoints carry it (`ema.safetensors`), so a resumed run continues it exactly.

Each process keeps a full copy of those weights (for a LoRA adapter, a few MB). Under
ZeRO-3 they are partitioned: the EMA gathers them (one all-gather of the adapter a step)
and writes into them through DeepSpeed's GatheredParameters, on every process at once.
"""

from __future__ import annotations

import contextlib

import torch

from ...models.zero3 import gathered

EMA_FILE = "ema.safetensors"


class ActorEMA:
    def __init__(self, arrangement, decay: float):
        if not 0.0 < decay < 1.0:
            raise ValueError(f"EMA decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.params = arrangement.actor_parameters()  # by name in the arrangement's state dict
        with gathered(self.params.values()):
            self.shadow = {n: p.detach().to(torch.float32, copy=True) for n, p in self.params.items()}

    @torch.no_grad()
    def update(self) -> None:
        """ema + (1 − decay)·(θ − ema), i.e. decay·ema + (1 − decay)·θ."""
        with gathered(self.params.values()):
            for name, param in self.params.items():
                self.shadow[name].lerp_(param.detach().float(), 1.0 - self.decay)

    @torch.no_grad()
    def _load_into_params(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Write `values` into the actor's weights; returns the weights they replaced."""
        with gathered(self.params.values(), modifier_rank=0):
            replaced = {n: p.detach().clone() for n, p in self.params.items()}
            for name, param in self.params.items():
                param.copy_(values[name])
        return replaced

    @contextlib.contextmanager
    def applied(self):
        """The actor runs with the EMA weights inside the block; the online ones come back after."""
        online = self._load_into_params(self.shadow)
        try:
            yield
        finally:
            self._load_into_params(online)

    def state_dict_for(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A copy of a full state dict (the arrangement's) with the EMA in the actor's place."""
        return {k: (self.shadow[k].to(v.dtype) if k in self.shadow else v) for k, v in state.items()}

    def state_dict(self) -> dict[str, torch.Tensor]:
        """Tensors only: the runner writes it to `ema.safetensors` in each checkpoint."""
        return {k: v.contiguous() for k, v in self.shadow.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        if state.keys() != self.shadow.keys():
            raise RuntimeError(f"{EMA_FILE} does not match the actor's weights")
        for name, tensor in state.items():
            self.shadow[name].copy_(tensor)
