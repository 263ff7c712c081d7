"""QLoRA on two real processes through the real CLI: a 4-bit `builtin:tiny` base under plain
DDP (gloo) and under DeepSpeed ZeRO-2 (its CPU accelerator).

Each process quantizes its own copy of the base as it loads (nf4 is deterministic, so the
copies are equal) and only the LoRA adapters (and PPO's value head) are trained, so the
gradients that DDP all-reduces and ZeRO-2 partitions are all in `model.dtype` (fp32 here, as
in test_qlora.py). A 2-process run must then reproduce the 1-process run with the same global
batch, with the tolerances of the unquantized 2-process tests (test_distributed.py for SFT,
test_distributed_ppo.py for PPO, whose comparisons are reused). ZeRO-3 is refused before
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

REPO = Path(__file__).resolve().parent.parent
FOUR_BIT = "model.quantization=4bit"
# How each run is launched: (processes, extra settings).
LAUNCHES = {"single": (1, []), "ddp": (2, []), "zero2": (2, [f"launch.deepspeed={ZERO2}"])}
# The ZeRO-2 SFT run also writes checkpoints (they change nothing it computes), for the resume test.
CHECKPOINTED = ["train.save_every=2"]


def two_ranks_on_4bit(test):
    """Marks a test that launches the real CLI on two processes with a 4-bit base."""
    needs_bnb = pytest.mark.skipif(not bitsandbytes_installed(), reason="bitsandbytes is not installed")
    return needs_bnb(pytest.mark.slow(pytest.mark.distributed(test)))


def launch_settings(launch: str) -> list[str]:
    processes, settings = LAUNCHES[launch]
    return [*settings, *(["launch.num_processes=2"] if processes == 2 else [])]


def sft_settings(launch: str) -> list[str]:
    """What an SFT run on the 4-bit base is given, the same global batch in every launch."""
    checkpoints = CHECKPOINTED if launch == "zero2" else []
    return [*TINY, FOUR_BIT, f"train.batch_size={GLOBAL_BATCH // LAUNCHES[launch][0]}", *checkpoints,
            *launch_settings(launch)]


def assert_4bit_record(run: Path) -> None:
    """final/ says the adapter was trained on an nf4 base (merge-lora rebuilds it from this)."""
    record = json.loads((run / "final" / QUANTIZATION_FILE).read_text())
    assert record["load_in_4bit"] and record["bnb_4bit_quant_type"] == "nf4"


@pytest.fixture(scope="module")
def work(rlhf_home, tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("distributed_qlora")


@pytest.fixture(scope="module")
def sft_runs(work):
    """run(launch) -> an SFT run directory on the 4-bit base, the same global batch each time."""

    @functools.cache
    def run(launch: str) -> Path:
        return rlhf("sft", "recipes/tiny-sft.yaml", work / f"sft-{launch}", *sft_settings(launch))

    return run


@two_ranks_on_4bit
@pytest.mark.parametrize("launch", ["ddp", "zero2"])
def test_4bit_sft_on_two_processes_matches_one(launch, sft_runs):
    reference, run = sft_runs("single"), sft_runs(launch)
    assert world_size(reference) == 1 and world_size(run) == 2
    assert_same_losses(run, reference)
    assert_same_adapter(run, reference)
    assert_4bit_record(run)


@two_ranks_on_4bit
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
def ppo_runs(work, sft_base):
    """run(launch) -> a PPO 1base-1lora run on the 4-bit base: policy, reference (adapter off)
    and critic body are the one quantized copy in each process."""

    @functools.cache
    def run(launch: str) -> Path:
        per_process = GLOBAL_ROLLOUT // LAUNCHES[launch][0]
        return rlhf("ppo", "recipes/tiny-ppo-1base-1lora.yaml", work / f"ppo-{launch}", *SETTINGS, FOUR_BIT,
                    f"model.base={sft_base}", f"ppo.rollout_batch_size={per_process}",
                    f"ppo.mini_batch_size={per_process}", *launch_settings(launch))

    return run


@two_ranks_on_4bit
@pytest.mark.parametrize("launch", ["ddp", "zero2"])
def test_4bit_ppo_on_two_processes_matches_one(launch, ppo_runs):
    reference, run = ppo_runs("single"), ppo_runs(launch)
    assert world_size(run) == 2
    assert_same_metrics(run, reference)
    assert_same_final(run, reference)
    assert_4bit_record(run)
