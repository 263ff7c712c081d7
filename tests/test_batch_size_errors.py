"""Less data than one global batch, through the CLI's entry point (`rlhf_cli.cli.main` in this
process: the `in_process` fixture): the error line names the keys of the stage that failed
(SFT: train.batch_size / train.grad_accum; PPO: ppo.rollout_batch_size for the prompts,
ppo.ptx_batch_size for the ptx rows), exit 2, nothing trained."""

from __future__ import annotations

import pytest
from cli_helpers import REPO, error_line

NO_EVAL = ["--set", "data.eval=null", "--set", "train.eval_every=null", "--set", "train.eval_reward_fn=null"]
SFT = ["sft", "-r", str(REPO / "recipes" / "tiny-sft.yaml"), "--set", "data.train=builtin:sort:train:3",
       *NO_EVAL, "--set", "train.batch_size=2", "--set", "train.grad_accum=2"]
PPO = ["ppo", "-r", str(REPO / "recipes" / "tiny-ppo-1base-1lora.yaml"),
       "--set", "data.train=builtin:sort:train:5", *NO_EVAL, "--set", "ppo.mini_batch_size=4"]

CASES = {
    "sft": (SFT, "only 3 training examples, fewer than one global batch (2 per process x 2 accumulation "
                 "x 1 processes = 4): lower train.batch_size or train.grad_accum"),
    "ppo prompts": ([*PPO, "--set", "ppo.rollout_batch_size=8"],
                    "only 5 prompts, fewer than one global batch (8 per process x 1 processes = 8): "
                    "lower ppo.rollout_batch_size"),
    "ppo ptx rows": ([*PPO, "--set", "ppo.rollout_batch_size=4", "--set", "ppo.ptx_coef=0.1",
                      "--set", "ppo.ptx_data=builtin:sort:train:3"],
                     "only 3 rows in ppo.ptx_data, fewer than one global batch (4 per process x 1 "
                     "processes = 4): lower ppo.ptx_batch_size"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_too_little_data_names_the_stages_own_batch_keys(case, in_process, capsys, tmp_path):
    argv, expected = CASES[case]
    assert in_process(*argv, "-o", "run") == 2
    line = error_line(capsys.readouterr().err)
    assert expected in line, line
    if case != "sft":
        assert "train.batch_size" not in line and "train.grad_accum" not in line
    assert not list(tmp_path.rglob("final")) and not list(tmp_path.rglob("checkpoints"))
