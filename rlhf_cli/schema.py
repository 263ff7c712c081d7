"""The recipe schema: one dataclass per section, every key described once, beside its field.

A field says its default, its allowed names or lower bound (`schema_fields`), and whether it
names a local file; checks that involve several keys are the section's `problems`. Kept free
of torch and of I/O (but for "does this named file exist") so that `rlhf --help`, `--dry-run`
and validation stay cheap. `config.py` turns YAML + `--set` overrides into these objects and
walks them to validate.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .algorithms.catalog import PREFERENCE_LOSS_NAMES, UNPAIRED_LOSS_NAMES
from .data.templates import TEMPLATES
from .schema_fields import Problems, above, at_least, choice, function_ref, local_path
from .schema_ppo import PPOSection
from .schema_rft import RFTSection
from .schema_rrhf import RRHFSection

STAGES = ("sft", "rm", "dpo", "ppo", "rft", "rrhf")


@dataclass
class LoraSection:
    r: int = at_least(16, 1)
    alpha: int = above(32, 0)
    dropout: float = 0.05
    # "auto" = every linear layer of the transformer blocks (peft's "all-linear"),
    # which finds the right names for LLaMA, Mistral, GPT-2, ... without a table; plus the
    # stacked expert weights of MoE blocks (models/lora_targets.py).
    target_modules: list[str] | str = "auto"
    bias: str = "none"


@dataclass
class ModelSection:
    base: str = local_path("builtin:tiny")
    tokenizer: str | None = local_path()  # defaults to the base's own tokenizer
    dtype: str = choice("auto", ("auto", "fp32", "bf16", "fp16"))
    lora: LoraSection | None = field(default_factory=LoraSection)
    # Run the modelling code a base ships (Baichuan, ...); checked in models/remote_code.py.
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    # bitsandbytes: 4bit = nf4 with double quantization (QLoRA), 8bit = LLM.int8; LoRA on top.
    quantization: str | None = choice(None, ("4bit", "8bit"))

    def problems(self, recipe: Recipe) -> Problems:
        if self.quantization and self.lora is None:
            yield "model.quantization", ("a quantized base cannot be fine-tuned in full (its weights are "
                                         "frozen integers): set model.lora, or model.quantization: null")


@dataclass
class DataSection:
    train: str = local_path("")
    eval: str | None = local_path()
    format: str = choice("auto", ("auto", "alpaca", "prompt_response", "messages"))
    template: str = choice("plain", TEMPLATES)
    max_length: int = at_least(512, 1)
    max_prompt_length: int | None = at_least(None, 1)

    def problems(self, recipe: Recipe) -> Problems:
        if not self.train:
            yield "data.train", "missing training data: set `data.train`"
        if self.max_prompt_length is not None and self.max_prompt_length >= self.max_length:
            yield "data.max_prompt_length", f"must be smaller than data.max_length ({self.max_length})"


@dataclass
class TrainSection:
    lr: float = above(2e-4, 0)
    schedule: str = choice("cosine", ("cosine", "linear", "constant"))
    warmup_steps: int = at_least(0, 0)
    warmup_ratio: float = at_least(0.0, 0)  # and below 1
    min_lr_ratio: float = 0.0
    batch_size: int = at_least(8, 1)  # per process
    eval_batch_size: int | None = at_least(None, 1)
    grad_accum: int = at_least(1, 1)
    max_steps: int | None = at_least(None, 1)  # optimizer steps; overrides epochs when set
    epochs: float = above(1.0, 0)
    seed: int = 42
    log_every: int = at_least(10, 1)
    save_every: int | None = at_least(None, 1)
    eval_every: int | None = at_least(None, 1)  # needs data.eval
    keep_checkpoints: int = at_least(2, 1)
    max_grad_norm: float = above(1.0, 0)
    # Dropout at 0 while training (modules, LoRA's, the config's); null: by stage, off for rm,
    # dpo and ppo (their losses compare forwards of one model), kept for sft.
    disable_dropout: bool | None = None
    # Steps with a NaN/inf loss or gradient are skipped; this many in a row stop the run.
    max_bad_steps: int = at_least(3, 1)
    weight_decay: float = at_least(0.0, 0)
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb
    # Generation-based evaluation: sample answers for eval prompts and score them with a
    # reward function (`module:function` or `file.py:function`), e.g. the built-in task's.
    eval_reward_fn: str | None = function_ref()  # needs data.eval
    eval_num_prompts: int = at_least(64, 1)
    eval_max_new_tokens: int = at_least(32, 1)

    def problems(self, recipe: Recipe) -> Problems:
        if self.eval_every is not None and not recipe.data.eval:
            yield "train.eval_every", "needs evaluation data: set `data.eval`"
        if self.warmup_ratio >= 1:
            yield "train.warmup_ratio", "must be below 1"
        if self.eval_reward_fn and not recipe.data.eval:
            yield "train.eval_reward_fn", "needs evaluation prompts: set `data.eval`"


@dataclass
class SFTSection:
    # False trains on the whole text (prompt included), like plain causal-LM fine-tuning.
    completion_only: bool = True


@dataclass
class RMSection:
    margin: float = 0.0
    lm_loss_weight: float = 0.0
    center_weight: float = 0.0


@dataclass
class DPOSection:
    beta: float = above(0.1, 0)
    loss_type: str = choice("sigmoid", PREFERENCE_LOSS_NAMES)  # each a loss in algorithms/preference.py
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    precompute_ref: bool = False
    # KTO's λ_D and λ_U; the paper keeps λ_D·n_D / (λ_U·n_U) within [1, 4/3].
    kto_desirable_weight: float = above(1.0, 0)
    kto_undesirable_weight: float = above(1.0, 0)
    # online DPO: data.train holds prompts; each step samples samples_per_prompt responses per
    # prompt from the current policy, and the judge's best and worst become a pair (ties: none).
    online: bool = False
    reward_model: str | None = local_path()
    reward_fn: str | None = function_ref()
    samples_per_prompt: int = at_least(4, 2)
    max_new_tokens: int = at_least(64, 1)
    temperature: float = above(1.0, 0)
    top_p: float = 1.0
    top_k: int = 0

    def problems(self, recipe: Recipe) -> Problems:
        if recipe.stage != "dpo" or not self.online:
            return
        if not (self.reward_model or self.reward_fn):
            yield "dpo.online", "online DPO needs a judge: set `dpo.reward_model` or `dpo.reward_fn`"
        if self.reward_model and self.reward_fn:
            yield "dpo.reward_fn", "online DPO takes one judge: set `dpo.reward_model` or `dpo.reward_fn`"
        if self.loss_type in UNPAIRED_LOSS_NAMES:
            yield ("dpo.loss_type", f"{self.loss_type} learns from unpaired completions, and online DPO "
                   "makes pairs: choose a paired loss (e.g. sigmoid)")
        if self.precompute_ref:
            yield ("dpo.precompute_ref", "online DPO samples new responses every step, so their "
                   "reference log-probs cannot be computed before training: set it to false")


@dataclass
class LaunchSection:
    # auto: in-process for 1 process, torchrun for more
    launcher: str = choice("auto", ("auto", "none", "torchrun", "accelerate"))
    num_processes: int = at_least(1, 1)  # per machine
    num_machines: int = at_least(1, 1)
    machine_rank: int = at_least(0, 0)
    main_process_ip: str | None = None
    main_process_port: int = 29500
    deepspeed: str | None = local_path()  # a DeepSpeed JSON config, e.g. recipes/deepspeed/zero2.json
    mixed_precision: str = choice("no", ("no", "fp16", "bf16"))
    cpu: bool = False  # force the CPU even when a GPU is visible

    def problems(self, recipe: Recipe) -> Problems:
        if self.num_machines > 1 and not self.main_process_ip:
            yield "launch.num_machines", "several machines need `launch.main_process_ip`"
        if self.machine_rank >= self.num_machines:
            yield "launch.machine_rank", "must be below launch.num_machines"
        if self.deepspeed and not Path(self.deepspeed).is_file():
            yield "launch.deepspeed", f"DeepSpeed config not found: {self.deepspeed}"


@dataclass
class Recipe:
    stage: str = choice("sft", STAGES)
    output_dir: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    sft: SFTSection = field(default_factory=SFTSection)
    rm: RMSection = field(default_factory=RMSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    ppo: PPOSection = field(default_factory=PPOSection)
    rft: RFTSection = field(default_factory=RFTSection)
    rrhf: RRHFSection = field(default_factory=RRHFSection)
    launch: LaunchSection = field(default_factory=LaunchSection)
