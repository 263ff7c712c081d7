"""The recipe schema: one dataclass per section, every default in one place.

Kept free of torch and of I/O so that `rlhf --help`, `--dry-run` and validation stay cheap.
`config.py` turns YAML + `--set` overrides into these objects and checks them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STAGES = ("sft", "rm", "dpo", "ppo")
DTYPES = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear", "constant")
TEMPLATES = ("plain", "alpaca", "llama2", "chatml", "tokenizer")
DATA_FORMATS = ("auto", "alpaca", "prompt_response", "messages")
LAUNCHERS = ("auto", "none", "torchrun", "accelerate")
MIXED_PRECISION = ("no", "fp16", "bf16")
# bitsandbytes: 4bit = nf4 with double quantization (QLoRA), 8bit = LLM.int8.
QUANTIZATIONS = ("4bit", "8bit")
DPO_LOSS_TYPES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto")
PPO_ARRANGEMENTS = ("separate", "2base-2lora", "1base-2lora", "1base-1lora")
KL_ESTIMATORS = ("k1", "k2", "k3")
# gae trains a critic; the others are critic-free (no value head, no value loss).
PPO_ADVANTAGES = ("gae", "grpo", "rloo", "reinforce_pp")


@dataclass
class LoraSection:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.05
    # "auto" = every linear layer of the transformer blocks (peft's "all-linear"),
    # which finds the right names for LLaMA, Mistral, GPT-2, ... without a table.
    target_modules: list[str] | str = "auto"
    bias: str = "none"


@dataclass
class ModelSection:
    base: str = "builtin:tiny"
    tokenizer: str | None = None  # defaults to the base's own tokenizer
    dtype: str = "auto"
    lora: LoraSection | None = field(default_factory=LoraSection)
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False
    attn_implementation: str | None = None
    quantization: str | None = None  # null | 4bit | 8bit: the frozen base, LoRA on top


@dataclass
class DataSection:
    train: str = ""
    eval: str | None = None
    format: str = "auto"
    template: str = "plain"
    max_length: int = 512
    max_prompt_length: int | None = None


@dataclass
class TrainSection:
    lr: float = 2e-4
    schedule: str = "cosine"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    min_lr_ratio: float = 0.0
    batch_size: int = 8  # per process
    eval_batch_size: int | None = None
    grad_accum: int = 1
    max_steps: int | None = None  # optimizer steps; overrides epochs when set
    epochs: float = 1.0
    seed: int = 42
    log_every: int = 10
    save_every: int | None = None
    eval_every: int | None = None
    keep_checkpoints: int = 2
    max_grad_norm: float = 1.0
    # Dropout at 0 while training (modules, LoRA's, the config's); null: by stage, off for rm,
    # dpo and ppo (their losses compare forwards of one model), kept for sft.
    disable_dropout: bool | None = None
    # Steps with a NaN/inf loss or gradient are skipped; this many in a row stop the run.
    max_bad_steps: int = 3
    weight_decay: float = 0.0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_eps: float = 1e-8
    report_to: list[str] = field(default_factory=list)  # tensorboard, wandb
    # Generation-based evaluation: sample answers for eval prompts and score them with a
    # reward function (`module:function` or `file.py:function`), e.g. the built-in task's.
    eval_reward_fn: str | None = None
    eval_num_prompts: int = 64
    eval_max_new_tokens: int = 32


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
    beta: float = 0.1
    loss_type: str = "sigmoid"
    label_smoothing: float = 0.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    precompute_ref: bool = False
    # KTO's λ_D and λ_U; the paper keeps λ_D·n_D / (λ_U·n_U) within [1, 4/3].
    kto_desirable_weight: float = 1.0
    kto_undesirable_weight: float = 1.0


@dataclass
class PPOSection:
    arrangement: str = "1base-1lora"
    reward_model: str | None = None
    reward_fn: str | None = None
    kl_coef: float = 0.05
    kl_estimator: str = "k1"
    adaptive_kl: bool = False
    kl_target: float = 6.0
    kl_horizon: int = 10000
    gamma: float = 1.0
    lam: float = 0.95
    clip_range: float = 0.2
    clip_range_value: float = 0.2
    vf_coef: float = 0.1
    critic_lr_ratio: float = 5.0
    ppo_epochs: int = 4
    rollout_batch_size: int = 64
    mini_batch_size: int = 16
    # Responses per forward/backward; mini_batch_size / micro_batch_size of them are accumulated
    # into one optimizer step (less activation memory, the same update). Default: the minibatch.
    micro_batch_size: int | None = None
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    reward_clip: float = 10.0
    normalize_reward: bool = False
    no_eos_penalty: float = -1.0
    critic_warmup_steps: int = 0
    # Advantage estimator: gae (critic + value head) or critic-free grpo, rloo, reinforce_pp.
    advantage: str = "gae"
    # Responses sampled per prompt (each prompt repeated); grpo and rloo need >= 2.
    samples_per_prompt: int = 1
    # InstructGPT's PPO-ptx: + ptx_coef x the SFT loss on ppo.ptx_data (SFT rows).
    ptx_coef: float = 0.0
    ptx_data: str | None = None
    ptx_batch_size: int | None = None  # SFT rows per update; default ppo.mini_batch_size
    # EMA of the actor's trainable weights, updated after every optimizer step; final/ holds it.
    ema_decay: float | None = None


@dataclass
class LaunchSection:
    launcher: str = "auto"  # auto: in-process for 1 process, torchrun for more
    num_processes: int = 1  # per machine
    num_machines: int = 1
    machine_rank: int = 0
    main_process_ip: str | None = None
    main_process_port: int = 29500
    deepspeed: str | None = None  # a DeepSpeed JSON config, e.g. recipes/deepspeed/zero2.json
    mixed_precision: str = "no"
    cpu: bool = False  # force the CPU even when a GPU is visible


@dataclass
class Recipe:
    stage: str = "sft"
    output_dir: str | None = None
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    train: TrainSection = field(default_factory=TrainSection)
    sft: SFTSection = field(default_factory=SFTSection)
    rm: RMSection = field(default_factory=RMSection)
    dpo: DPOSection = field(default_factory=DPOSection)
    ppo: PPOSection = field(default_factory=PPOSection)
    launch: LaunchSection = field(default_factory=LaunchSection)


# Keys whose value must be one of a fixed set of names.
CHOICES: dict[str, tuple[str, ...]] = {
    "stage": STAGES,
    "model.dtype": DTYPES,
    "model.quantization": QUANTIZATIONS,
    "data.format": DATA_FORMATS,
    "data.template": TEMPLATES,
    "train.schedule": SCHEDULES,
    "dpo.loss_type": DPO_LOSS_TYPES,
    "ppo.arrangement": PPO_ARRANGEMENTS,
    "ppo.kl_estimator": KL_ESTIMATORS,
    "ppo.advantage": PPO_ADVANTAGES,
    "launch.launcher": LAUNCHERS,
    "launch.mixed_precision": MIXED_PRECISION,
}

# (key, lower bound, inclusive?) for numbers that must be positive or non-negative.
BOUNDS: tuple[tuple[str, float, bool], ...] = (
    ("model.lora.r", 1, True),
    ("model.lora.alpha", 0, False),
    ("data.max_length", 1, True),
    ("data.max_prompt_length", 1, True),
    ("train.lr", 0, False),
    ("train.batch_size", 1, True),
    ("train.eval_batch_size", 1, True),
    ("train.grad_accum", 1, True),
    ("train.max_steps", 1, True),
    ("train.epochs", 0, False),
    ("train.log_every", 1, True),
    ("train.save_every", 1, True),
    ("train.eval_every", 1, True),
    ("train.keep_checkpoints", 1, True),
    ("train.max_grad_norm", 0, False),
    ("train.max_bad_steps", 1, True),
    ("train.warmup_steps", 0, True),
    ("train.warmup_ratio", 0, True),
    ("train.weight_decay", 0, True),
    ("train.eval_num_prompts", 1, True),
    ("train.eval_max_new_tokens", 1, True),
    ("dpo.beta", 0, False),
    ("dpo.kto_desirable_weight", 0, False),
    ("dpo.kto_undesirable_weight", 0, False),
    ("ppo.ppo_epochs", 1, True),
    ("ppo.rollout_batch_size", 1, True),
    ("ppo.mini_batch_size", 1, True),
    ("ppo.micro_batch_size", 1, True),
    ("ppo.max_new_tokens", 1, True),
    ("ppo.temperature", 0, False),
    ("ppo.samples_per_prompt", 1, True),
    ("ppo.ptx_coef", 0, True),
    ("ppo.ptx_batch_size", 1, True),
    ("ppo.ema_decay", 0, False),
    ("launch.num_processes", 1, True),
    ("launch.num_machines", 1, True),
    ("launch.machine_rank", 0, True),
)
