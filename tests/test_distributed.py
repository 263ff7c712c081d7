"""Two real processes through the real CLI: DDP (gloo), DeepSpeed ZeRO-2 and ZeRO-3.

Each 2-process launch costs ~10-15 s of imports on a 2-core machine, so every run is a
few tiny steps and each run serves several checks. A 2-process run must reproduce the
1-process run with the same global batch (fp32, no dropout): same per-step losses and
the same adapter weights. One fast test checks how a DeepSpeed JSON is resolved.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from distributed_helpers import with_own_leaf_module, zero3_every_weight_sharded

from rlhf_cli.errors import UserError

REPO = Path(__file__).resolve().parent.parent
STEPS = 5
GLOBAL_BATCH = 8
REL_TOL = 1e-4
ZERO2 = "recipes/deepspeed/zero2.json"
ZERO3 = "recipes/deepspeed/zero3.json"
ZERO3_OFFLOAD = "recipes/deepspeed/zero3-offload.json"
TINY = [
    f"train.max_steps={STEPS}", "train.log_every=1", "data.max_length=32",
    "train.eval_every=null", "train.save_every=null", "train.eval_reward_fn=null",
    "model.dtype=fp32", "model.lora.dropout=0.0",
]


def two_ranks(test):
    """Marks a test that launches the real CLI on two processes."""
    return pytest.mark.slow(pytest.mark.distributed(test))


def rlhf(out: Path, *settings: str, resume: bool = False, check: bool = True):
    argv = [sys.executable, "-m", "rlhf_cli.cli", "sft", "--recipe", "recipes/tiny-sft.yaml",
            "-o", str(out)]
    for setting in [*TINY, *settings]:
        argv += ["--set", setting]
    argv += ["--resume"] if resume else []
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=240)
    if check and done.returncode != 0:
        raise AssertionError(f"rlhf exited {done.returncode}:\n{done.stderr[-4000:]}")
    return done


def two_processes(*settings: str) -> list[str]:
    return ["launch.num_processes=2", f"train.batch_size={GLOBAL_BATCH // 2}", *settings]


def train_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in rows if r.get("split") != "eval" and "loss" in r}


def world_size(run: Path) -> int:
    return json.loads((run / "run.json").read_text())["world_size"]


def adapter(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "final" / "adapter_model.safetensors"))


def assert_same_losses(run: Path, reference: Path, steps=range(1, STEPS + 1)) -> None:
    got, want = train_losses(run), train_losses(reference)
    for step in steps:
        assert math.isfinite(got[step])
        assert got[step] == pytest.approx(want[step], rel=REL_TOL), f"step {step}"


def assert_same_adapter(run: Path, reference: Path) -> None:
    got, want = adapter(run), adapter(reference)
    assert got.keys() == want.keys() and got
    for name, tensor in want.items():
        assert got[name].shape == tensor.shape and got[name].numel() > 0, name
        assert (got[name] - tensor).abs().max().item() < 1e-5, name


@pytest.fixture(scope="module")
def runs(rlhf_home, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed")


@pytest.fixture(scope="module")
def single(runs) -> Path:
    """The reference: one process, the whole global batch at once."""
    out = runs / "single"
    rlhf(out, f"train.batch_size={GLOBAL_BATCH}")
    assert world_size(out) == 1
    return out


@pytest.fixture(scope="module")
def zero2(runs) -> Path:
    """ZeRO-2 with accumulation (2 ranks x 2 micro-batches x 2), checkpoints every 2 steps."""
    out = runs / "zero2"
    rlhf(out, "launch.num_processes=2", f"launch.deepspeed={ZERO2}", "train.batch_size=2",
         "train.grad_accum=2", "train.save_every=2")
    return out


@two_ranks
def test_ddp_matches_one_process(runs, single):
    out = runs / "ddp"
    rlhf(out, *two_processes())
    assert world_size(out) == 2
    assert_same_losses(out, single)
    assert_same_adapter(out, single)


@two_ranks
def test_zero2_with_accumulation_matches_one_process(zero2, single):
    assert world_size(zero2) == 2
    assert_same_losses(zero2, single)
    assert_same_adapter(zero2, single)
    shards = list((zero2 / "checkpoints" / "step-2" / "deepspeed").glob("*optim_states.pt"))
    assert len(shards) == 2  # one optimizer partition per rank


@two_ranks
def test_zero2_resume_continues_the_same_run(runs, zero2):
    """Resume from step 2 in a copy: steps 3.. repeat the uninterrupted run exactly."""
    out = runs / "zero2-resumed"
    shutil.copytree(zero2, out)
    shutil.rmtree(out / "checkpoints" / "step-4")
    done = rlhf(out, "launch.num_processes=2", f"launch.deepspeed={ZERO2}", "train.batch_size=2",
                "train.grad_accum=2", "train.save_every=2", resume=True)
    assert "resuming from" in done.stderr and "step 2" in done.stderr
    assert sorted(train_losses(out)) == list(range(1, STEPS + 1))
    assert_same_losses(out, zero2, steps=range(3, STEPS + 1))
    assert_same_adapter(out, zero2)


@two_ranks
@pytest.mark.parametrize("preset", ["as-shipped", "every-weight-sharded"])
def test_zero3_lora_with_generation_eval(runs, single, preset):
    """Sharded weights: generation on every rank (uneven prompts), gathered adapter."""
    out = runs / f"zero3-{preset}"
    config = ZERO3 if preset == "as-shipped" else zero3_every_weight_sharded(runs)
    rlhf(out, *two_processes(f"launch.deepspeed={config}"),
         "train.eval_reward_fn=rlhf_cli.builtin.tasks:sort_reward",
         "train.eval_num_prompts=5", "train.eval_max_new_tokens=6")
    assert world_size(out) == 2
    assert_same_losses(out, single)
    assert_same_adapter(out, single)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if r.get("split") == "eval"]
    assert [r["step"] for r in scored] == [0, STEPS]
    assert all(0.0 <= r["score"] <= 1.0 for r in scored)


@two_ranks
def test_zero3_with_decoder_layers_as_leaf_modules_matches_one_process(runs, single):
    """A JSON whose leaf_module makes leaves of the LoRA'd decoder layers: the first one's input
    (the frozen embedding's output) requires no grad, where DeepSpeed reduced its gradients
    before its backward ("The size of tensor a (0) must match the size of tensor b (32)",
    exit 1); models/zero3.py `leaf_inputs_require_grad`."""
    out = runs / "zero3-leaf-layers"
    config = with_own_leaf_module(zero3_every_weight_sharded(runs), ["LlamaDecoderLayer"])
    rlhf(out, *two_processes(f"launch.deepspeed={config}"))
    assert world_size(out) == 2
    assert_same_losses(out, single)
    assert_same_adapter(out, single)


@two_ranks
def test_zero3_offload_uses_deepspeeds_optimizer_on_the_recipes_schedule(runs, single):
    """Offload refuses a client optimizer: DeepSpeed's own (torch AdamW on CPU) takes the
    recipe's values, and the loop's schedule must still set its learning rate."""
    out = runs / "zero3-offload"
    rlhf(out, *two_processes(f"launch.deepspeed={ZERO3_OFFLOAD}"))
    assert world_size(out) == 2
    assert_same_losses(out, single)
    assert_same_adapter(out, single)


@two_ranks
def test_zero3_full_fine_tuning_saves_a_whole_model(runs):
    from transformers import AutoModelForCausalLM

    out = runs / "zero3-full"
    rlhf(out, *two_processes(f"launch.deepspeed={ZERO3}", "model.lora=null", "train.lr=1e-3"))
    assert world_size(out) == 2
    losses = list(train_losses(out).values())
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert all(p.numel() > 0 for p in model.parameters())


def test_a_first_zero3_run_on_a_fresh_cache_builds_the_builtin_model_whole(tmp_path, monkeypatch):
    """One process is enough: under ZeRO-3 transformers built the built-in model inside
    zero.Init, so the fresh cache got empty weights (3480 bytes) behind its marker and the run
    failed loading them ("copying a param with shape torch.Size([0])"), as did every later run."""
    from safetensors.torch import load_file

    from rlhf_cli.builtin.model import build_model

    monkeypatch.setenv("RLHF_HOME", str(tmp_path / "home"))
    rlhf(tmp_path / "run", f"launch.deepspeed={ZERO3}", "train.max_steps=1")
    cached = load_file(str(tmp_path / "home" / "builtin" / "tiny-v1" / "model.safetensors"))
    fresh = build_model("tiny").state_dict()
    assert cached.keys() == fresh.keys() and all(torch.equal(v, fresh[k]) for k, v in cached.items())


@two_ranks
@pytest.mark.parametrize("launcher", ["torchrun", "accelerate"])
def test_user_error_in_workers_is_one_line_and_status_2(runs, tmp_path, launcher):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a", "response": "b"}\n{not json\n')
    done = rlhf(runs / f"bad-{launcher}", *two_processes(f"data.train={bad}", "data.eval=null",
                                                         f"launch.launcher={launcher}"), check=False)
    assert done.returncode == 2, done.stderr[-2000:]
    errors = [line for line in done.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "bad.jsonl:2" in errors[0]
    assert "Traceback" not in done.stderr and "ChildFailedError" not in done.stderr


def test_deepspeed_config_takes_the_recipes_values(tmp_path):
    from rlhf_cli.config import load_recipe
    from rlhf_cli.engine.deepspeed_backend import deepspeed_config

    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({
        "zero_optimization": {"stage": 3, "offload_optimizer": {"device": "cpu"},
                              "reduce_bucket_size": "auto"},
        "train_micro_batch_size_per_gpu": "auto",
        "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": "auto"}},
    }))
    recipe = load_recipe(REPO / "recipes/tiny-sft.yaml",
                         [f"launch.deepspeed={ds}", "train.batch_size=4", "train.grad_accum=2"])
    config = deepspeed_config(recipe, world_size=2, on_cpu=True)
    assert config["train_batch_size"] == 16 and config["gradient_accumulation_steps"] == 2
    assert "scheduler" not in config and "reduce_bucket_size" not in config["zero_optimization"]
    optimizer = config["optimizer"]["params"]
    assert optimizer["lr"] == recipe.train.lr and optimizer["torch_adam"] is True

    ds.write_text(json.dumps({"train_micro_batch_size_per_gpu": 16}))
    with pytest.raises(UserError, match="train_micro_batch_size_per_gpu"):
        deepspeed_config(recipe, world_size=2)
    ds.write_text(json.dumps({"scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 10}}}))
    with pytest.raises(UserError, match="scheduler"):
        deepspeed_config(recipe, world_size=2)


def test_deepspeeds_own_optimizer_keeps_each_groups_learning_rate(monkeypatch):
    """With an "optimizer" section DeepSpeed builds the optimizer from our param groups: PPO's
    critic group must keep its own rate (ppo.critic_lr_ratio), not fall back to the config's."""
    import deepspeed
    import torch

    from rlhf_cli.engine.deepspeed_backend import DeepSpeedBackend

    captured = {}

    class Engine:
        basic_optimizer = module = None

    def initialize(**kwargs):
        captured.update(kwargs)
        return Engine(), None, None, None

    monkeypatch.setattr(deepspeed, "initialize", initialize)
    backend = object.__new__(DeepSpeedBackend)
    backend.config = {"optimizer": {"type": "AdamW", "params": {"lr": 1e-4}}}
    actor, critic = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(2))
    optimizer = torch.optim.AdamW([{"params": [actor], "lr": 1e-4},
                                   {"params": [critic], "lr": 5e-4, "weight_decay": 0.0}])
    backend.prepare(torch.nn.Linear(1, 1), optimizer)
    groups = captured["model_parameters"]
    assert [g["lr"] for g in groups] == [1e-4, 5e-4]
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0]
