"""`rlhf rrhf` and online DPO on two real gloo processes through the real CLI (slow).

RRHF reads fixed data, so two processes with half the per-process batch must compute what one
process computes: the same losses and the same adapter. Online DPO samples from a stream per
process, so two processes cannot equal one; instead both must take the same update (the same
weights on both ranks at the end) and a resumed run must equal the uninterrupted one. Its
judge is a file of the test's own (`probe.py`), which also records each rank's weights when
the run saves final/."""

from __future__ import annotations

import json
import math
import shutil
import subprocess
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, read_jsonl, rlhf
from fault_helpers import assert_same_run, weights

STEPS = 4
TWO = "launch.num_processes=2"


def run(work: Path, stage: str, recipe: str, out: str, settings: list[str],
        resume: bool = False) -> subprocess.CompletedProcess:
    args = [stage, "--recipe", str(REPO / "recipes" / recipe), "-o", out]
    for setting in settings:
        args += ["--set", setting]
    proc = rlhf(*args, *(["--resume"] if resume else []), cwd=work, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def world_size(run_dir: Path) -> int:
    return json.loads((run_dir / "run.json").read_text())["world_size"]


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_jsonl(run_dir / "metrics.jsonl")
            if r.get("split") != "eval" and "loss" in r}


def lora_b_moved(adapter: dict) -> float:
    """The largest LoRA B entry: B starts at zero, so this is how far training moved it."""
    return max(float(t.abs().max()) for name, t in adapter.items() if "lora_B" in name)


RRHF = ["model.base=builtin:tiny", f"train.max_steps={STEPS}", "train.log_every=1", "train.lr=1e-3",
        "train.warmup_steps=0", "train.eval_every=null", "train.save_every=null",
        "train.eval_reward_fn=null", "data.eval=null", "data.max_length=32"]


@pytest.mark.slow
@pytest.mark.distributed
def test_rrhf_on_two_processes_equals_one(rlhf_home, tmp_path):
    """Global batch 8 prompts (pairs, K = 2): 8 on one process, 4 on each of two."""
    run(tmp_path, "rrhf", "tiny-rrhf.yaml", "one", [*RRHF, "train.batch_size=8"])
    run(tmp_path, "rrhf", "tiny-rrhf.yaml", "two", [*RRHF, "train.batch_size=4", TWO])
    one, two = tmp_path / "one", tmp_path / "two"
    assert world_size(one) == 1 and world_size(two) == 2
    want, got = losses(one), losses(two)
    assert sorted(got) == sorted(want) == list(range(1, STEPS + 1))
    for step in want:
        assert math.isfinite(got[step]) and got[step] == pytest.approx(want[step], rel=1e-4), step
    a, b = (weights(r / "final" / "adapter_model.safetensors") for r in (two, one))
    assert a.keys() == b.keys() and a
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-5
    assert lora_b_moved(b) > 1e-3  # the runs learnt something, so equal weights mean something


PROBE = '''
import os
from pathlib import Path
import torch
import rlhf_cli.stages.dpo as dpo_stage

HERE, RANK = Path(__file__).parent, os.environ.get("RANK", "0")
_save = dpo_stage.save_final_model

def _recorded(backend, model, *args, **kwargs):
    trained = {n: p.detach().clone() for n, p in backend.unwrap(model).named_parameters() if p.requires_grad}
    torch.save(trained, HERE / f"weights-rank{RANK}.pt")
    return _save(backend, model, *args, **kwargs)

dpo_stage.save_final_model = _recorded

def reward(prompts, responses):
    return [len(set(r)) / 10 for r in responses]  # varied on a random model, ties too
'''


def online_dpo(work: Path) -> list[str]:
    return ["model.base=builtin:tiny", TWO, f"dpo.reward_fn={work / 'probe.py'}:reward",
            "dpo.samples_per_prompt=3", "dpo.max_new_tokens=6", "train.batch_size=2",
            "train.max_steps=3", "train.save_every=2", "train.log_every=1", "train.lr=1e-3",
            "train.eval_every=null", "train.eval_reward_fn=null", "data.eval=null", "data.max_length=32"]


@pytest.mark.slow
@pytest.mark.distributed
def test_online_dpo_ranks_take_the_same_update_and_resume_exactly(rlhf_home, tmp_path):
    (tmp_path / "probe.py").write_text(PROBE)
    run(tmp_path, "dpo", "tiny-online-dpo.yaml", "run", online_dpo(tmp_path))
    straight = tmp_path / "run"
    assert world_size(straight) == 2
    rows = [r for r in read_jsonl(straight / "metrics.jsonl") if "pairs" in r]
    assert sum(r["pairs"] for r in rows) > 0  # real pairs, not only stand-ins
    rank0, rank1 = (torch.load(tmp_path / f"weights-rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys() and rank0
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)  # one update, on both ranks
    assert lora_b_moved(weights(straight / "final" / "adapter_model.safetensors")) > 1e-4

    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)
    assert sorted(p.name for p in (resumed / "checkpoints").iterdir()) == ["step-2"]
    proc = run(tmp_path, "dpo", "tiny-online-dpo.yaml", "resumed", online_dpo(tmp_path), resume=True)
    assert "resuming from" in proc.stderr
    assert_same_run(resumed, straight)
