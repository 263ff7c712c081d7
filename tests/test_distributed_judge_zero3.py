"""The judge adapter under DeepSpeed ZeRO-3 on two real CPU processes (slow): PPO 1base-1lora
(model_judge on the arrangement's RM adapter) and rft (make_judge's adapter), each with a
reward model that is an RM run on the policy's base, riding on the sharded policy as a frozen
adapter. Every score the run used must be the RM's own score of the same tokens, the RM loaded
on its own in this process (peft on a sequence classifier, as `rlhf eval` loads it).

A probe (a sitecustomize on PYTHONPATH, as in test_distributed_ppo.py) records, on each rank,
the token ids of every scored prompt + response and the score the judge gave it."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, read_jsonl, rlhf
from distributed_helpers import probe_env, write_probe, zero3_every_weight_sharded
from test_rft_round import independent_rm

PROBE = '''\
import json, os


def _log(rows):
    with open(f"{os.environ['RLHF_PROBE_LOG']}.rank{os.environ.get('RANK', '0')}", "a") as log:
        for ids, value in rows:
            log.write(json.dumps({"ids": ids, "score": float(value)}) + "\\n")


def _patch_ppo(module):
    original = module.PPO.score

    def score(self, rollout, index):
        scores, responses = original(self, rollout, index)
        _log([(ids[mask.bool()].tolist(), value)
              for ids, mask, value in zip(rollout.input_ids, rollout.attention_mask, scores)])
        return scores, responses

    module.PPO.score = score


def _patch_rft(module):
    original = module.sample_and_score

    def sample_and_score(*args, **kwargs):
        out = original(*args, **kwargs)
        _log([(list(e["prompt_input_ids"]) + ids, value)
              for e, ids, value in zip(out.examples, out.response_ids, out.scores)])
        return out

    module.sample_and_score = sample_and_score


PATCHES = {"rlhf_cli.stages.ppo.run": _patch_ppo, "rlhf_cli.stages.rft.round": _patch_rft}

'''


def rm_score(rm, ids: list[int]) -> float:
    tokens = torch.tensor([ids])
    with torch.no_grad():
        return float(rm(input_ids=tokens, attention_mask=torch.ones_like(tokens)).logits[0, 0])


def assert_scored_as_the_rm_itself(log: Path, rm_run: Path, per_rank: int) -> None:
    rm = independent_rm(rm_run)
    for rank in (0, 1):
        rows = read_jsonl(Path(f"{log}.rank{rank}"))
        assert len(rows) == per_rank
        for row in rows:
            want = rm_score(rm, row["ids"])
            assert abs(row["score"] - want) < 1e-4, (rank, row["score"], want)
    # The adapter matters: without it the same tokens score otherwise (the check can fail).
    with rm.disable_adapter():
        assert abs(rm_score(rm, rows[0]["ids"]) - rows[0]["score"]) > 1e-3


def run_probed(tmp_path: Path, stage: str, recipe: str, settings: list[str]) -> None:
    """`rlhf STAGE` on 2 ZeRO-3 processes (every weight sharded) with the scoring probe on."""
    sharded = zero3_every_weight_sharded(tmp_path)
    settings = [*settings, "launch.num_processes=2", f"launch.deepspeed={sharded}"]
    args = [stage, "--recipe", str(REPO / "recipes" / recipe), "-o", "run"]
    for setting in settings:
        args += ["--set", setting]
    env = probe_env(write_probe(tmp_path / "probe", PROBE), tmp_path / "scored", str(REPO))
    proc: subprocess.CompletedProcess = rlhf(*args, cwd=tmp_path, env=env, timeout=400)
    assert proc.returncode == 0, proc.stderr[-4000:]


@pytest.mark.slow
@pytest.mark.distributed
def test_rm_adapter_on_a_zero3_policy_scores_as_the_rm_itself(rlhf_home, rm_run, tmp_path):
    run_probed(tmp_path, "ppo", "tiny-ppo-1base-1lora.yaml", [
        "model.base=builtin:tiny", "ppo.reward_fn=null", f"ppo.reward_model={rm_run}",
        "train.max_steps=2", "train.log_every=1", "train.eval_every=null", "train.save_every=null",
        "train.eval_reward_fn=null", "data.eval=null", "ppo.rollout_batch_size=4",
        "ppo.mini_batch_size=4", "ppo.ppo_epochs=1", "ppo.max_new_tokens=6"])
    assert json.loads((tmp_path / "run" / "run.json").read_text())["world_size"] == 2
    assert_scored_as_the_rm_itself(tmp_path / "scored", rm_run, per_rank=2 * 4)  # 2 iterations x 4


@pytest.mark.slow
@pytest.mark.distributed
def test_rm_adapter_on_a_zero3_rft_policy_scores_as_the_rm_itself(rlhf_home, rm_run, tmp_path):
    """The same through make_judge (rft's judge): the RM adapter on the sharded SFT policy."""
    run_probed(tmp_path, "rft", "tiny-rft.yaml", [
        "model.base=builtin:tiny", "rft.reward_fn=null", f"rft.reward_model={rm_run}",
        "rft.rounds=1", "rft.prompts_per_round=4", "rft.samples_per_prompt=2", "rft.max_new_tokens=6",
        "rft.sample_batch_size=4", "train.batch_size=1", "train.max_steps=1", "train.save_every=null",
        "train.eval_reward_fn=null", "data.eval=null"])
    assert len(read_jsonl(tmp_path / "run" / "rounds" / "round-1.jsonl")) == 4  # best of each prompt
    assert_scored_as_the_rm_itself(tmp_path / "scored", rm_run, per_rank=2 * 2)  # 2 prompts x 2 each
