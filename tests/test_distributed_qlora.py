"""QLoRA on two real processes through the real CLI: a 4-bit base (`builtin:tiny`, or the merged
SFT model for RM, DPO and PPO) under plain DDP (gloo) and under DeepSpeed ZeRO-2 (its CPU
accelerator); SFT also on an 8-bit base under ZeRO-2.

Each process quantizes its own copy of the base as it loads (nf4 is deterministic, so the
copies are equal) and only the LoRA adapters (the RM's score head, PPO's value head) are trained, so the
gradients that DDP all-reduces and ZeRO-2 partitions are all in `model.dtype` (fp32 here, as
in test_qlora.py). A 2-process run must then reproduce the 1-process run with the same global
batch, with the tolerances of the unquantized 2-process tests (test_distributed.py for SFT, RM
and DPO, test_distributed_ppo.py for PPO, whose comparisons are reused). ZeRO-3 is refused before
anything launches (test_qlora.py): it would partition the packed 4-bit weights.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from cli_helpers import cli_env
from test_distributed import (
    GLOBAL_BATCH,
    STEPS,
    TINY,
    ZERO2,
    assert_same_adapter,
    assert_same_losses,
    train_losses,
    world_size,
)
from test_distributed_ppo import (
    GLOBAL_ROLLOUT,
    SETTINGS,
    assert_same_final,
    assert_same_metrics,
    merged_sft_model,
    rlhf,
)

from rlhf_cli.models.quantization import QUANTIZATION_FILE, bitsandbytes_installed
from rlhf_cli.stages.rm import REWARD_STATS

REPO = Path(__file__).resolve().parent.parent
FOUR_BIT = "model.quantization=4bit"
# How each run is launched: (processes, extra settings).
LAUNCHES = {"single": (1, []), "ddp": (2, []), "zero2": (2, [f"launch.deepspeed={ZERO2}"])}
# The 4-bit ZeRO-2 SFT run also writes checkpoints (they change nothing it computes), for the resume test.
CHECKPOINTED = ["train.save_every=2"]
# No held-out pairs: the RM's reward statistics then come from 512 training pairs, which the
# ranks score in shards, and DPO has nothing else to evaluate.
NO_EVAL = "data.eval=null"


def two_ranks_quantized(test):
    """Marks a test that launches the real CLI on two processes with a quantized base."""
    needs_bnb = pytest.mark.skipif(not bitsandbytes_installed(), reason="bitsandbytes is not installed")
    return needs_bnb(pytest.mark.slow(pytest.mark.distributed(test)))


def launch_settings(launch: str) -> list[str]:
    processes, settings = LAUNCHES[launch]
    return [*settings, *(["launch.num_processes=2"] if processes == 2 else [])]


def per_process_batch(launch: str) -> str:
    """The same global batch in every launch."""
    return f"train.batch_size={GLOBAL_BATCH // LAUNCHES[launch][0]}"


def sft_settings(launch: str, bits: str = "4bit") -> list[str]:
    """What an SFT run on the 4-bit (or 8-bit) base is given."""
    checkpoints = CHECKPOINTED if (launch, bits) == ("zero2", "4bit") else []
    return [*TINY, f"model.quantization={bits}", per_process_batch(launch), *checkpoints,
            *launch_settings(launch)]


def assert_quantization_record(run: Path, bits: str = "4bit") -> None:
    """final/ says which quantized base the adapter was trained on (merge-lora rebuilds it from this)."""
    record = json.loads((run / "final" / QUANTIZATION_FILE).read_text())
    if bits == "4bit":
        assert record["load_in_4bit"] and record["bnb_4bit_quant_type"] == "nf4"
    else:
        assert record["load_in_8bit"] and not record["load_in_4bit"]


@pytest.fixture(scope="module")
def work(rlhf_home, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed_qlora")


@pytest.fixture(scope="module")
def sft_runs(work):
    """run(launch, bits) -> an SFT run directory on the 4-bit (8-bit) base, the same global batch
    each time."""

    @functools.cache
    def run(launch: str, bits: str = "4bit") -> Path:
        out = work / f"sft-{bits}-{launch}"
        return rlhf("sft", "recipes/tiny-sft.yaml", out, *sft_settings(launch, bits))

    return run


@two_ranks_quantized
@pytest.mark.parametrize(("launch", "bits"), [("ddp", "4bit"), ("zero2", "4bit"), ("zero2", "8bit")])
def test_quantized_sft_on_two_processes_matches_one(launch, bits, sft_runs):
    reference, run = sft_runs("single", bits), sft_runs(launch, bits)
    assert world_size(reference) == 1 and world_size(run) == 2
    assert_same_losses(run, reference)
    assert_same_adapter(run, reference)
    assert_quantization_record(run, bits)


@two_ranks_quantized
def test_4bit_zero2_resume_continues_the_same_run(sft_runs, work):
    """DeepSpeed's checkpoint holds the whole module, the 4-bit base's bitsandbytes state
    included, which torch's strict load refused ("Unexpected key(s) in state_dict: ...
    weight.absmax"). Resumed from step 2 in a copy, steps 3.. repeat the uninterrupted run."""
    uninterrupted = sft_runs("zero2")
    out = work / "sft-zero2-resumed"
    shutil.copytree(uninterrupted, out)
    shutil.rmtree(out / "checkpoints" / "step-4")
    argv = [sys.executable, "-m", "rlhf_cli.cli", "sft", "--recipe", "recipes/tiny-sft.yaml", "-o", str(out),
            "--resume"]
    for setting in sft_settings("zero2"):
        argv += ["--set", setting]
    done = subprocess.run(argv, cwd=REPO, env=cli_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-4000:]
    assert "resuming from" in done.stderr and "(step 2)" in done.stderr
    assert sorted(train_losses(out)) == list(range(1, STEPS + 1))
    assert_same_losses(out, uninterrupted, steps=range(3, STEPS + 1))
    assert_same_adapter(out, uninterrupted)


@pytest.fixture(scope="module")
def sft_base(work) -> Path:
    """The merged SFT model (unquantized): PPO then quantizes it to 4 bits as it loads."""
    return merged_sft_model(work / "sft-30")


@pytest.fixture(scope="module")
def pair_runs(work, sft_base):
    """run(stage, launch) -> an RM or DPO run on the 4-bit SFT base (for DPO the reference is
    that base with the adapter off), the same global batch of pairs each time."""

    @functools.cache
    def run(stage: str, launch: str) -> Path:
        return rlhf(stage, f"recipes/tiny-{stage}.yaml", work / f"{stage}-{launch}", *TINY, FOUR_BIT,
                    f"model.base={sft_base}", NO_EVAL, per_process_batch(launch), *launch_settings(launch))

    return run


# DDP only: under ZeRO-2 they train what SFT trains (LoRA; the RM's score head besides), and
# both matched there too when checked by hand (+23 s and +30 s).
@two_ranks_quantized
@pytest.mark.parametrize("stage", ["rm", "dpo"])
def test_4bit_rm_and_dpo_on_two_processes_match_one(stage, pair_runs):
    reference, run = pair_runs(stage, "single"), pair_runs(stage, "ddp")
    assert world_size(reference) == 1 and world_size(run) == 2
    assert_same_losses(run, reference)
    assert_same_adapter(run, reference)  # for the RM, with its score head
    assert_quantization_record(run)
    if stage == "rm":
        got, want = (json.loads((r / "final" / REWARD_STATS).read_text()) for r in (run, reference))
        for key in ("mean", "std", "accuracy"):
            assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key


@pytest.fixture(scope="module")
def ppo_runs(work, sft_base, pair_runs):
    """run(arrangement, launch) -> a PPO run on the 4-bit base. 1base-1lora: policy, reference
    (adapter off) and critic body are the one quantized copy in each process, scored by the
    task's function; 1base-2lora adds a critic adapter and the frozen adapter of the 4-bit RM
    trained on that base (the 1-process RM run) as the reward model."""

    @functools.cache
    def run(arrangement: str, launch: str) -> Path:
        per_process = GLOBAL_ROLLOUT // LAUNCHES[launch][0]
        reward = ([] if arrangement == "1base-1lora"
                  else ["ppo.reward_fn=null", f"ppo.reward_model={pair_runs('rm', 'single')}"])
        return rlhf("ppo", f"recipes/tiny-ppo-{arrangement}.yaml", work / f"ppo-{arrangement}-{launch}",
                    *SETTINGS, FOUR_BIT, f"model.base={sft_base}", *reward,
                    f"ppo.rollout_batch_size={per_process}", f"ppo.mini_batch_size={per_process}",
                    *launch_settings(launch))

    return run


@two_ranks_quantized
@pytest.mark.parametrize("launch", ["ddp", "zero2"])
@pytest.mark.parametrize("arrangement", ["1base-1lora", "1base-2lora"])
def test_4bit_ppo_on_two_processes_matches_one(arrangement, launch, ppo_runs):
    reference, run = ppo_runs(arrangement, "single"), ppo_runs(arrangement, launch)
    assert world_size(run) == 2
    assert_same_metrics(run, reference)
    assert_same_final(run, reference)
    assert_quantization_record(run)
