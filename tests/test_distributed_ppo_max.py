"""PPO-max's running reward moments and DAPO's dynamic sampling on two real gloo processes.

- Reward scaling and centering (`ppo.reward_scaling`, `ppo.reward_centering`): the running
  moments take in every process's scores (an all-reduce of their sums), so two processes
  with the same global batch scale by the same numbers as one process does: the same
  `reward_running_mean` / `reward_running_std`, losses and `final/` weights.
- Dynamic sampling (`ppo.dynamic_sampling`): every process samples the same number of rounds
  and the extra prompts of round k are one global batch split over the ranks, as without it.
  Which groups are kept depends on where they land, so two processes reproduce one only when
  each rank keeps the groups one process keeps, in the same rounds. The reward function below
  makes that so: the groups at even positions of each scoring call vary, the others don't,
  and each rank's call holds an even number of groups. With 4 prompts a round, one process
  keeps 2 of 4 and two processes 1 of 2 each, in each of 2 rounds: the same 4 groups.

Same protocol and tolerance as test_distributed_ppo.py (argmax sampling, one minibatch per
rollout, a 30-step SFT model so responses end at different lengths).
"""

from __future__ import annotations

import pytest
from test_distributed_ppo import (  # noqa: F401  (module fixtures: the SFT model to start from)
    ABS_TOL,
    GLOBAL_ROLLOUT,
    ITERATIONS,
    REL_TOL,
    SETTINGS,
    assert_same_final,
    assert_same_metrics,
    metrics,
    rlhf,
    sft_base,
    two_ranks,
    work,
)

SCALING = ["ppo.reward_scaling=true", "ppo.reward_centering=true", "ppo.reward_clip=1.5",
           "ppo.advantage_clip=0.5"]
# Groups at even positions of each call score (0, 1) for their two samples (the argmax samples are
# identical: only the position tells them apart); odd positions score (0.5, 0.5): no signal.
POSITIONAL_REWARD = """\
def positional(prompts, responses):
    return [(i % 2 if (i // 2) % 2 == 0 else 0.5) for i in range(len(responses))]
"""
# gae, not grpo: a group's two argmax samples are the same sequence, so grpo's advantages (+a, −a)
# would cancel to a gradient of rounding noise, which Adam blows up to full-size steps that differ
# between the runs; the critic's whitened advantages give each group a net gradient.
DYNAMIC = ["ppo.samples_per_prompt=2", "ppo.dynamic_sampling=true", "ppo.max_sampling_rounds=3",
           "train.eval_reward_fn=null"]
PROMPTS_PER_ROUND = 4


def launch(work_dir, name: str, recipe: str, processes: int, settings: list[str]):
    per_process = GLOBAL_ROLLOUT // processes
    extra = ["launch.num_processes=2"] if processes == 2 else []
    return rlhf("ppo", recipe, work_dir / f"{name}-{processes}", *SETTINGS, *settings, *extra,
                f"ppo.rollout_batch_size={per_process}", f"ppo.mini_batch_size={per_process}")


@two_ranks
def test_running_reward_moments_on_two_processes_match_one(work, sft_base):  # noqa: F811
    settings = [*SCALING, f"model.base={sft_base}"]
    runs = [launch(work, "scaling", "recipes/tiny-ppo-1base-2lora.yaml", n, settings) for n in (1, 2)]
    assert_same_metrics(runs[1], runs[0])
    assert_same_final(runs[1], runs[0])
    (train, _), (want, _) = metrics(runs[1]), metrics(runs[0])
    assert want[0]["reward_running_std"] > 0.01  # the scores varied: the scaling did something
    for got, row in zip(train, want, strict=True):
        for key in ("reward_running_mean", "reward_running_std"):
            assert got[key] == pytest.approx(row[key], rel=REL_TOL, abs=ABS_TOL), (row["step"], key)


@two_ranks
def test_dynamic_sampling_on_two_processes_matches_one(work, sft_base):  # noqa: F811
    (work / "positional.py").write_text(POSITIONAL_REWARD)
    settings = [*DYNAMIC, f"model.base={sft_base}", f"ppo.reward_fn={work / 'positional.py'}:positional"]
    # rollout_batch_size counts prompts; each is sampled twice (mini_batch_size counts responses).
    runs = []
    for processes in (1, 2):
        per_process = PROMPTS_PER_ROUND // processes
        extra = ["launch.num_processes=2"] if processes == 2 else []
        runs.append(rlhf("ppo", "recipes/tiny-ppo-1base-2lora.yaml", work / f"dynamic-{processes}", *SETTINGS,
                         *settings, *extra, f"ppo.rollout_batch_size={per_process}",
                         f"ppo.mini_batch_size={2 * per_process}"))
    (train, _), (want, _) = metrics(runs[1]), metrics(runs[0])
    assert len(train) == len(want) == ITERATIONS
    for got, row in zip(train, want, strict=True):
        assert (row["sampling_rounds"], row["prompts_drawn"], row["groups_kept"]) == (2, 8, 4), row
        assert (got["sampling_rounds"], got["prompts_drawn"], got["groups_kept"]) == (2, 8, 4), got
        assert row["grad_norm"] > 1e-3  # a real gradient, not rounding noise
        for key in ("score", "kl", "loss", "policy_loss", "value_loss", "entropy", "response_length",
                    "clip_frac", "approx_kl", "grad_norm", "frac_reward_zero_std"):
            assert got[key] == pytest.approx(row[key], rel=REL_TOL, abs=ABS_TOL), (row["step"], key)
    assert want[-1]["kl"] > 0.01  # the policy moved: later rows compare updates too
