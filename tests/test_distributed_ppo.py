"""PPO on two real processes through the real CLI: DDP (gloo), DeepSpeed ZeRO-2 and ZeRO-3.

A 2-process run must reproduce the 1-process run with the same global batch: the same
score, KL, losses and entropy in every iteration's metrics.jsonl row, the same greedy
evaluation, and the same `final/` (policy adapter and value head), which loads with peft.

What makes the two comparable:
- Rollouts sample with `ppo.top_k=1`, i.e. from the argmax only. Sampling otherwise draws
  from each rank's own generator, so two ranks cannot draw what one process draws.
- One minibatch per rollout (`mini_batch_size == rollout_batch_size`, both per process):
  the minibatch is then the whole global batch in both runs (the per-rank shuffles of
  smaller minibatches differ from the one-process shuffle).
- A start from a briefly trained SFT model, so that responses end at different lengths:
  the token-mean losses must then be weighted by each rank's share of the tokens.
Tolerance: fp32 runs that differ only in summation order (gradient all-reduce, padding
widths of the per-rank batches) agree to ~1e-6 relative after 3 iterations (measured
<= 5e-6); REL_TOL = 1e-4 leaves room for that and still fails on any real difference (an
unweighted per-rank token-mean moved the step-2 score from 0.4512 to 0.4601 and logged
rank 0's loss, -0.47 instead of -0.014).

ZeRO-3 runs with every weight sharded (the preset's persistence threshold keeps all of the
tiny model's weights whole) and a probe (a sitecustomize on PYTHONPATH) that counts the
all-gathers inside each rollout: the generation model's weights are gathered once per
rollout, not once per generated token.

Each launch costs ~10-25 s on a 2-core machine, so every run serves several checks.
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from distributed_helpers import probe_env, write_probe, zero3_every_weight_sharded

REPO = Path(__file__).resolve().parent.parent
ITERATIONS = 3
ADAM_STEP = 2e-4  # the tiny PPO recipes' lr: what one Adam step moves a weight by, at most
GLOBAL_ROLLOUT = 8
REL_TOL, ABS_TOL = 1e-4, 1e-6
COMPARED = ("score", "kl", "loss", "policy_loss", "value_loss", "entropy", "response_length",
            "no_eos_share", "clip_frac", "approx_kl", "grad_norm")
ZERO2 = "recipes/deepspeed/zero2.json"
SETTINGS = [
    f"train.max_steps={ITERATIONS}", "train.log_every=1", "train.eval_every=null",
    "train.save_every=null", "train.eval_num_prompts=8", "train.eval_max_new_tokens=8",
    "ppo.ppo_epochs=2", "ppo.top_k=1", "ppo.max_new_tokens=8",
]
# 1base-1lora scores with the task's reward function; 1base-2lora with a reward model
# (a frozen adapter on the sharded base; the critic starts as a trainable copy of it).
ARRANGEMENTS = ("1base-1lora", "1base-2lora")
LAUNCHES = ("ddp", "zero2", "zero3")

PROBE = '''\
"""Test probe, active with RLHF_PROBE_LOG: per PPO rollout, the all-gathers, the model
forwards inside generate(), and the generation model's sharded (ZeRO-3) weights."""
import json
import os

state = {"active": False, "gathers": 0, "forwards": 0}


def _patch_distributed(module):
    import torch.distributed as dist  # DeepSpeed takes its all-gather from here when it starts

    def counting(original):
        def gather(*args, **kwargs):
            state["gathers"] += state["active"]
            return original(*args, **kwargs)
        return gather

    for name in ("all_gather", "all_gather_into_tensor", "_all_gather_base"):
        if hasattr(dist, name):
            setattr(dist, name, counting(getattr(dist, name)))


def _patch_generate(module):
    original = module.GenerationMixin.generate

    def generate(self, *args, **kwargs):
        def count(*_):
            state["forwards"] += state["active"]
        handle = self.register_forward_pre_hook(count)
        try:
            return original(self, *args, **kwargs)
        finally:
            handle.remove()

    module.GenerationMixin.generate = generate


def _patch_rollout(module):
    original = module.sample

    def sample(arrangement, *args, **kwargs):
        sharded = sum(hasattr(p, "ds_id") and not p.ds_persist
                      for p in arrangement.generation_model().parameters())
        state.update(active=True, gathers=0, forwards=0)
        try:
            return original(arrangement, *args, **kwargs)
        finally:
            state["active"] = False
            row = {"gathers": state["gathers"], "forwards": state["forwards"], "sharded": sharded}
            with open(f"{os.environ['RLHF_PROBE_LOG']}.rank{os.environ.get('RANK', '0')}", "a") as log:
                log.write(json.dumps(row) + "\\n")

    module.sample = sample


PATCHES = {"deepspeed.comm": _patch_distributed, "transformers.generation.utils": _patch_generate,
           "rlhf_cli.engine.rollout": _patch_rollout}

'''


def two_ranks(test):
    """Marks a test that launches the real CLI on two processes."""
    return pytest.mark.slow(pytest.mark.distributed(test))


def rlhf(stage: str, recipe: str, out: Path, *settings: str, env: dict | None = None) -> Path:
    argv = [sys.executable, "-m", "rlhf_cli.cli", stage, "--recipe", recipe, "-o", str(out), "--overwrite"]
    for setting in settings:
        argv += ["--set", setting]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
           **(env or {})}
    env.pop("RLHF_DEBUG", None)
    done = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    if done.returncode != 0:
        raise AssertionError(f"rlhf {stage} exited {done.returncode}:\n{done.stderr[-4000:]}")
    return out


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def work(rlhf_home, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed_ppo")


def merged_sft_model(out: Path) -> Path:
    """A 30-step SFT run in `out`, merged into `out`-merged: it answers, and its answers end at
    different lengths, so each rank's share of the tokens matters."""
    run = rlhf("sft", "recipes/tiny-sft.yaml", out, "train.max_steps=30", "train.warmup_steps=5",
               "train.eval_every=null", "train.save_every=null", "train.eval_reward_fn=null")
    merged = out.with_name(f"{out.name}-merged")
    argv = [sys.executable, "-m", "rlhf_cli.cli", "merge-lora", str(run), "--out", str(merged)]
    done = subprocess.run(argv, cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return merged


@pytest.fixture(scope="module")
def sft_base(work) -> Path:
    return merged_sft_model(work / "sft")


@pytest.fixture(scope="module")
def reward_model(work, sft_base) -> Path:
    return rlhf("rm", "recipes/tiny-rm.yaml", work / "rm", f"model.base={sft_base}", "train.max_steps=3",
                "train.eval_every=null", "train.save_every=null")


@pytest.fixture(scope="module")
def zero3_sharded(work) -> Path:
    """The ZeRO-3 preset with every weight sharded (its 1e5-element persistence threshold is
    larger than any weight of the tiny model, which would then never be partitioned)."""
    write_probe(work / "probe", PROBE)
    return zero3_every_weight_sharded(work)


@pytest.fixture(scope="module")
def ppo_runs(work, sft_base, reward_model, zero3_sharded):
    """run(arrangement, launch) -> the run directory, launched once per module."""

    @functools.cache
    def run(arrangement: str, launch: str) -> Path:
        out = work / f"{arrangement}-{launch}"
        settings = [*SETTINGS, f"model.base={sft_base}"]
        if arrangement == "1base-2lora":
            settings += ["ppo.reward_fn=null", f"ppo.reward_model={reward_model}"]
        per_process = GLOBAL_ROLLOUT if launch == "single" else GLOBAL_ROLLOUT // 2
        settings += [f"ppo.rollout_batch_size={per_process}", f"ppo.mini_batch_size={per_process}"]
        if launch != "single":
            settings.append("launch.num_processes=2")
        if launch.endswith("-micro"):  # the process's minibatch of 4 in 2 micro-batches
            settings.append("ppo.micro_batch_size=2")
        env = None
        if launch.startswith("zero2"):
            settings.append(f"launch.deepspeed={ZERO2}")
        if launch.startswith("zero3"):
            settings.append(f"launch.deepspeed={zero3_sharded}")
            env = probe_env(work / "probe", out / "probe", os.environ.get("PYTHONPATH", ""))
        recipe = f"recipes/tiny-ppo-{arrangement}.yaml"
        return rlhf("ppo", recipe, out, *settings, env=env)

    return run


def metrics(run: Path) -> tuple[list[dict], list[dict]]:
    rows = read_jsonl(run / "metrics.jsonl")
    return [r for r in rows if r.get("split") != "eval"], [r for r in rows if r.get("split") == "eval"]


def assert_same_metrics(run: Path, reference: Path) -> None:
    (train, evals), (want_train, want_evals) = metrics(run), metrics(reference)
    assert [r["step"] for r in train] == [r["step"] for r in want_train] == list(range(1, ITERATIONS + 1))
    assert want_train[-1]["kl"] > 0.1  # the policy moved, so later rows test the updates too
    first = [s["response"] for s in read_jsonl(reference / "samples.jsonl") if s["step"] == 1]
    assert len({len(r) for r in first}) > 1  # uneven lengths: each rank's token share matters
    for got, want in zip(train, want_train, strict=True):
        for key in COMPARED:
            assert got[key] == pytest.approx(want[key], rel=REL_TOL, abs=ABS_TOL), (got["step"], key)
    assert [r["step"] for r in evals] == [r["step"] for r in want_evals] == [0, ITERATIONS]
    for got, want in zip(evals, want_evals, strict=True):
        assert got["score"] == pytest.approx(want["score"], rel=REL_TOL, abs=ABS_TOL)


def assert_same_final(run: Path, reference: Path) -> None:
    """final/ holds the same policy adapter and value head, and loads with peft."""
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    for name in ("adapter_model.safetensors", "value_head.safetensors"):
        got, want = load_file(str(run / "final" / name)), load_file(str(reference / "final" / name))
        assert got.keys() == want.keys() and got, name
        differences = []
        for key, tensor in want.items():
            assert got[key].shape == tensor.shape and got[key].numel() > 0, key
            differences.append((got[key] - tensor).abs().flatten())
        difference = torch.cat(differences)
        # Adam turns a rounding-level difference in a near-zero gradient (another summation
        # order over the ranks, another CPU's kernels) into a fraction of a step (lr 2e-4) for
        # that one weight: 1 of 296k adapter weights was 1.6e-5 off on an AVX2-only CPU, with a
        # mean difference of 1.3e-9; on a 4-bit base (AMD EPYC) one was 1.1e-4 off, mean 2.2e-9,
        # and one process taking its batch in two micro-batches (a new summation order, nothing
        # distributed) moved that same weight by 5.6e-5. A sharding or averaging error moves
        # many weights by ~lr: the mean catches it (one 64x32 LoRA matrix off by lr: 1.4e-6).
        assert difference.max().item() < ADAM_STEP, name
        assert difference.mean().item() < 1e-8, name
    base = json.loads((run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    policy = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base), str(run / "final")).eval()
    ids = AutoTokenizer.from_pretrained(str(run / "final"))("sort dcba =", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        moved = policy(ids).logits
        with policy.disable_adapter():
            assert not torch.allclose(moved, policy(ids).logits)


def assert_gathered_once_per_rollout(run: Path) -> None:
    for rank in (0, 1):
        rows = read_jsonl(run / f"probe.rank{rank}")
        assert len(rows) == ITERATIONS, rows
        for row in rows:
            assert row["sharded"] > 10 and row["forwards"] >= 3, row
            # At most one all-gather per sharded weight for the whole rollout; per token it
            # would be one per weight and forward (95 x 9 on this model before the fix).
            assert 0 < row["gathers"] <= row["sharded"], row


@two_ranks
@pytest.mark.parametrize("launch", LAUNCHES)
@pytest.mark.parametrize("arrangement", ARRANGEMENTS)
def test_two_processes_match_one_process(arrangement, launch, ppo_runs):
    reference, run = ppo_runs(arrangement, "single"), ppo_runs(arrangement, launch)
    assert json.loads((run / "run.json").read_text())["world_size"] == 2
    assert_same_metrics(run, reference)
    assert_same_final(run, reference)
    if launch == "zero3":
        assert_gathered_once_per_rollout(run)


# 1base-2lora runs each micro-batch as an actor pass, then a critic pass: two backwards a
# micro-batch (DDP skipped, the gradients averaged by hand; DeepSpeed's accumulation boundary on
# the critic's backward only). In micro-batches too, two processes must reproduce one.
@two_ranks
@pytest.mark.parametrize("launch", ["ddp-micro", "zero2-micro", "zero3-micro"])
def test_critic_apart_in_micro_batches_on_two_processes_matches_one(launch, ppo_runs):
    reference, run = ppo_runs("1base-2lora", "single"), ppo_runs("1base-2lora", launch)
    assert_same_metrics(run, reference)
    assert_same_final(run, reference)


# reinforce_pp whitens its advantages over the whole batch of all processes, ptx splits its
# SFT batch over the ranks, and the EMA follows every applied step (under ZeRO-3 it gathers
# the sharded adapter): with the same global batches, two processes must still reproduce one,
# also when each process accumulates its minibatch from micro-batches (ppo.micro_batch_size).
OPTIONS = ["ppo.advantage=reinforce_pp", "ppo.ptx_coef=0.3", "ppo.ptx_data=builtin:sort",
           "ppo.ema_decay=0.8"]
OPTION_COMPARED = ("score", "kl", "loss", "policy_loss", "ptx_loss", "entropy", "response_length",
                   "clip_frac", "approx_kl", "grad_norm")


@pytest.fixture(scope="module")
def option_runs(work, sft_base, zero3_sharded):
    """run(launch) -> the critic-free run with OPTIONS, launched once per module."""

    @functools.cache
    def run(launch: str) -> Path:
        processes = 1 if launch == "single" else 2
        per_process = GLOBAL_ROLLOUT // processes
        settings = [*SETTINGS, *OPTIONS, f"model.base={sft_base}",
                    f"ppo.rollout_batch_size={per_process}", f"ppo.mini_batch_size={per_process}",
                    f"ppo.ptx_batch_size={4 // processes}"]
        if processes == 2:
            settings.append("launch.num_processes=2")
        if launch.startswith(("zero2", "zero3")):
            settings.append(f"launch.deepspeed={ZERO2 if launch.startswith('zero2') else zero3_sharded}")
        if launch.endswith("-micro"):  # the process's minibatch of 4 in 4 forward/backwards
            settings.append("ppo.micro_batch_size=1")
        return rlhf("ppo", "recipes/tiny-ppo-1base-1lora.yaml", work / f"options-{launch}", *settings)

    return run


@two_ranks
@pytest.mark.parametrize("launch", [*LAUNCHES, "ddp-micro", "zero2-micro"])
def test_critic_free_ptx_and_ema_on_two_processes_match_one(launch, option_runs):
    import torch
    from safetensors.torch import load_file

    reference, run = option_runs("single"), option_runs(launch)
    (train, evals), (want_train, want_evals) = metrics(run), metrics(reference)
    assert len(train) == len(want_train) == ITERATIONS
    assert want_train[-1]["kl"] > 0.01 and want_train[-1]["ptx_loss"] > 0
    assert "value_loss" not in want_train[-1]  # no critic
    for got, want in zip(train, want_train, strict=True):
        for key in OPTION_COMPARED:
            assert got[key] == pytest.approx(want[key], rel=REL_TOL, abs=ABS_TOL), (got["step"], key)
    for got, want in zip(evals, want_evals, strict=True):  # the EMA policy is what is evaluated
        assert got["score"] == pytest.approx(want["score"], rel=REL_TOL, abs=ABS_TOL)
    def gaps(a: dict, b: dict):
        assert a.keys() == b.keys() and a
        return torch.cat([(a[k] - b[k]).abs().flatten() for k in a])

    for kind in ("final", "final-online"):  # EMA and online weights both match
        gap = gaps(load_file(str(run / kind / "adapter_model.safetensors")),
                   load_file(str(reference / kind / "adapter_model.safetensors")))
        # Adam turns rounding into up to ~5e-5 in a few weights whose gradient is ~0 (seen under
        # ZeRO-3: 1 of 296k weights); a wrong EMA or update moves nearly all of them (below).
        assert gap.max() < 2e-4 and (gap > 1e-5).float().mean() < 1e-3, (kind, float(gap.max()))
    ema_vs_online = gaps(load_file(str(reference / "final" / "adapter_model.safetensors")),
                         load_file(str(reference / "final-online" / "adapter_model.safetensors")))
    assert (ema_vs_online > 1e-5).float().mean() > 0.5  # measured 0.97: the EMA is not the online policy
