"""DeepSpeed ZeRO-2/3 through `deepspeed.initialize`, one process per rank (torchrun).

Accelerate's DeepSpeed plugin saw a world of one on CPU machines, so we drive DeepSpeed
directly; on CPUs DeepSpeed picks its CPU accelerator and gloo. The recipe fills the
config's "auto" values (micro-batch, accumulation, clipping, precision, optimizer).

The recipe owns the optimizer and the schedule: the loop's AdamW (engine/optim.py) is
handed to DeepSpeed as a client optimizer, and the loop's LambdaLR sets its learning rate
before every step. Only ZeRO-Offload needs DeepSpeed's own optimizer (it refuses a client
one there), so an offloading config gets an "optimizer" section built from the same
recipe values, and the schedule then drives that optimizer's param groups.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import torch

from ..config import micro_batching
from ..errors import UserError
from ..models.zero3 import (
    check_leaf_modules,
    gather_with_wrapper,
    leaf_inputs_require_grad,
    parameter_wrappers,
    passes_twice_per_backward,
    trainable_leaf_classes,
    without_default_leaf_modules,
)
from ..preflight import read_deepspeed_json
from ..schema import Recipe, TrainSection
from .backend import Backend, local_rank

TAG = "deepspeed"
WHERE = "launch.deepspeed"


def _fill_auto(config: dict, key: str, value) -> None:
    """Resolve an "auto" (or missing) value; an explicit one must agree with the recipe.

    The recipe is the one source of these numbers: the loop counts micro-batches and
    accumulation itself, so a config that disagreed would make DeepSpeed step the
    optimizer at the wrong micro-batch (or clip differently from what run.json says).
    """
    current = config.get(key, "auto")
    if current == "auto":
        config[key] = value
    elif current != value:
        raise UserError(f'"{key}" is {current} in the DeepSpeed config but the recipe gives '
                        f'{value}; set it to "auto" to take the recipe\'s value', where=WHERE)


def _precision(config: dict, section: str, enabled: bool) -> None:
    block = config.setdefault(section, {})
    if block.get("enabled", "auto") == "auto":
        block["enabled"] = enabled


def _all_auto(section: dict) -> bool:
    params = section.get("params", {})
    return all(value == "auto" for value in params.values())


def _drop_auto_scheduler(config: dict) -> None:
    """The schedule is the recipe's (train.schedule); an all-"auto" one means just that."""
    scheduler = config.get("scheduler")
    if scheduler is None:
        return
    if not _all_auto(scheduler):
        raise UserError('the DeepSpeed config has a "scheduler"; the learning-rate schedule '
                        "comes from the recipe (train.schedule, train.warmup_steps): remove it",
                        where=WHERE)
    del config["scheduler"]


def _drop_auto_zero_sizes(config: dict) -> None:
    """HF-style configs say "auto" for ZeRO bucket sizes (transformers' Trainer derives them
    from the hidden size); DeepSpeed rejects the word, and its own defaults serve."""
    zero = config.get("zero_optimization", {})
    for key in [k for k, v in zero.items() if v == "auto"]:
        del zero[key]


def offloads_optimizer(config: dict) -> bool:
    offload = config.get("zero_optimization", {}).get("offload_optimizer") or {}
    return offload.get("device", "none") in ("cpu", "nvme")


def _fill_optimizer(config: dict, train: TrainSection, on_cpu: bool) -> None:
    """A config "optimizer" section (AdamW from the recipe unless the user wrote one)."""
    section = config.setdefault("optimizer", {"type": "AdamW"})
    params = section.setdefault("params", {})
    adam = section.get("type", "").lower() in ("adam", "adamw")
    recipe_values = {"lr": train.lr, "betas": [train.adam_beta1, train.adam_beta2],
                     "eps": train.adam_eps, "weight_decay": train.weight_decay}
    for key, value in recipe_values.items():
        # Another optimizer type may take no `eps` or `betas`: fill only what it asks for.
        if params.get(key) == "auto" or (adam and key not in params):
            params[key] = value
    if on_cpu and adam:
        # DeepSpeed's default Adam on a CPU is its compiled CPU-Adam op (a C++ build at
        # start-up); torch's AdamW needs no build and computes the same update.
        params.setdefault("torch_adam", True)


def deepspeed_config(recipe: Recipe, world_size: int, on_cpu: bool = True) -> dict:
    """The user's JSON with every "auto" resolved from the recipe (pure)."""
    config = read_deepspeed_json(recipe.launch.deepspeed, WHERE)
    train = recipe.train
    micro, accumulation = micro_batching(recipe)
    _fill_auto(config, "train_micro_batch_size_per_gpu", micro)
    _fill_auto(config, "gradient_accumulation_steps", accumulation)
    _fill_auto(config, "gradient_clipping", train.max_grad_norm)
    _fill_auto(config, "train_batch_size", micro * accumulation * world_size)
    _precision(config, "bf16", recipe.launch.mixed_precision == "bf16")
    _precision(config, "fp16", recipe.launch.mixed_precision == "fp16")
    _drop_auto_scheduler(config)
    _drop_auto_zero_sizes(config)
    if "optimizer" in config or offloads_optimizer(config):
        _fill_optimizer(config, train, on_cpu)
    return config


def zero_stage(config: dict) -> int:
    return int(config.get("zero_optimization", {}).get("stage", 0))


def _single_process_env() -> None:
    """Let `deepspeed.init_distributed` start a world of one without torchrun.

    Without these variables DeepSpeed falls back to MPI discovery (and mpi4py).
    """
    if "RANK" in os.environ:
        return
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def _skip_shm_comm_build() -> None:
    """Do not JIT-compile DeepSpeed's shared-memory all-reduce op on CPU machines.

    It only serves DeepSpeed's inference all-reduce (tensor-parallel inference); training
    collectives go through gloo. Building it costs a C++ compile (~1.5 min) on the first
    run of every fresh machine and needs a compiler, for nothing.
    """
    import importlib

    # Not `import deepspeed.comm.torch as m`: that name resolves to the torch package,
    # which deepspeed.comm imports under the same attribute name.
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None


class DeepSpeedBackend(Backend):
    def __init__(self, recipe: Recipe):
        import deepspeed
        import torch.distributed as dist
        from deepspeed.accelerator import get_accelerator

        name = get_accelerator().device_name()
        if name == "cpu":
            _skip_shm_comm_build()
        _single_process_env()
        deepspeed.init_distributed()
        self.world_size, self.rank = dist.get_world_size(), dist.get_rank()
        self.device = torch.device(name if name == "cpu" else f"{name}:{local_rank()}")
        self.config = deepspeed_config(recipe, self.world_size, on_cpu=name == "cpu")
        self.config_path, self.twice = recipe.launch.deepspeed, passes_twice_per_backward(recipe)
        self.stage = zero_stage(self.config)
        # ZeRO-3 copies a weight's gradient partition at the first backward of a step and adds
        # to it after: a weight first reached by a later pass (the critic's, after the
        # actor's) would add to the previous step's gradient (measured: 2 ranks then differ
        # from 1). There the update keeps one forward/backward per micro-batch.
        self.passes_apart = self.stage != 3
        if self.stage == 3:
            # Held alive so that from_pretrained loads weights already partitioned
            # (a 70B model never sits whole in one process) and generate() syncs ranks.
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed = HfDeepSpeedConfig(self.config)

    def prepare(self, model, optimizer):
        import deepspeed

        stage3 = zero_stage(self.config) == 3
        if stage3 and (leaves := trainable_leaf_classes(model, self.config)):
            # a JSON's own leaf_module holding LoRA weights (models/zero3.py)
            check_leaf_modules(leaves, self.config_path, self.twice)
            leaf_inputs_require_grad(model)
        # LoRA on MoE experts under ZeRO-3: the wrappers gather what they read (models/zero3.py)
        wrappers = parameter_wrappers(model) if stage3 else []
        if wrappers:
            without_default_leaf_modules(self.config)
        if "optimizer" in self.config:
            # DeepSpeed builds the optimizer from the config; keep the loop's param
            # groups: their weight decay (none on biases and norms) and their own learning
            # rates (PPO's critic group runs at ppo.critic_lr_ratio times the actor's), and a
            # group's own Adam betas/eps where it has them (PPO-max's critic); the others
            # take the config's.
            own = {k: v for k, v in optimizer.defaults.items() if k in ("betas", "eps")}
            groups = [{"params": g["params"], "weight_decay": g["weight_decay"], "lr": g["lr"],
                       **{k: g[k] for k in own if g[k] != own[k]}} for g in optimizer.param_groups]
            self.engine, *_ = deepspeed.initialize(model=model, model_parameters=groups,
                                                   config=self.config)
        else:
            self.engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                   config=self.config)
        gather_with_wrapper(wrappers)
        # The schedule sets the learning rate on the basic optimizer's param groups, which
        # the ZeRO wrapper reads at every step (the client optimizer when we passed one).
        self.optimizer = self.engine.basic_optimizer
        self.model = self.engine
        return self.engine

    def unwrap(self, model=None):
        return self.engine.module

    def autocast(self):
        return contextlib.nullcontext()  # DeepSpeed casts weights itself

    def accumulating(self, more_to_come: bool, partial: bool = False):
        return contextlib.nullcontext()  # DeepSpeed reduces only at the boundary

    def backward(self, loss: torch.Tensor, last_pass: bool = True) -> None:
        # The loop already divides by the global batch weight: no extra 1/accumulation.
        if not last_pass:
            # A micro-batch run in passes (1base-2lora's actor, then critic; not under ZeRO-3,
            # see `passes_apart`): an earlier pass is no micro-step (no step() call: DeepSpeed
            # counts those) and never the accumulation boundary, where ZeRO-2 assembles the
            # step's gradients (a backward before it at the boundary is reported lost:
            # allenai/open-instruct#1498); the last pass is the micro-batch's one micro-step.
            self.engine.set_gradient_accumulation_boundary(False)
            try:
                self.engine.backward(loss, scale_wrt_gas=False)
            finally:
                self.engine.set_gradient_accumulation_boundary(None)  # back to DeepSpeed's count
            return
        self.engine.backward(loss, scale_wrt_gas=False)
        # Steps the optimizer only on the accumulation boundary (counted by DeepSpeed,
        # which is why the config's accumulation must equal the recipe's: config.micro_batching).
        self.engine.step()

    def optimizer_step(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return float(norm) if norm is not None else float("nan")

    def full_state_dict(self, model) -> dict:
        """Whole-model weights on rank 0 (ZeRO-3 gathers them layer by layer; collective)."""
        if self.stage == 3:
            return self.engine._zero3_consolidated_16bit_state_dict() or {}
        return self.engine.module.state_dict()

    def save_state(self, directory: Path) -> None:
        # Collective: each rank writes its own optimizer (and ZeRO-3 weight) partition.
        self.engine.save_checkpoint(str(directory), tag=TAG, save_latest=False)

    def _module_loader(self):
        """How the checkpoint's module state is loaded: DeepSpeed's strict `load_state_dict`
        (None), or over a quantized base, whose bitsandbytes state that refuses."""
        from ..models.quantization import load_state_over_quantized_base, quantization_state_keys

        if not quantization_state_keys(self.engine.module):
            return None
        return lambda src, dst: load_state_over_quantized_base(dst, src)

    def load_state(self, directory: Path) -> None:
        # The loop restores its LambdaLR itself (scheduler.pt); DeepSpeed has none.
        path, _ = self.engine.load_checkpoint(str(directory), tag=TAG, load_lr_scheduler_states=False,
                                              custom_load_fn=self._module_loader())
        if path is None:
            raise UserError(f"cannot load the DeepSpeed checkpoint in {directory}")
