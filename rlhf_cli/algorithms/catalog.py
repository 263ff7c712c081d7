"""The names a recipe may choose among the algorithms, and what each one implies. No torch.

The schema reads these names (`dpo.loss_type`, `ppo.kl_estimator`, `ppo.advantage`) so that
`rlhf --help`, validation and `--dry-run` stay cheap; the torch registries that implement them
(`preference.PREFERENCE_LOSSES`, `kl.KL_ESTIMATORS`, `advantages.GROUP_BASELINES`) are kept
in step with these by tests/test_algorithms_registries.py.
"""

from __future__ import annotations

from dataclasses import dataclass

# `dpo.loss_type`: the DPO family on pairs, and KTO on unpaired completions.
PREFERENCE_LOSS_NAMES = ("sigmoid", "ipo", "hinge", "robust", "simpo", "orpo", "kto")
# Those of them that read unpaired completions, not pairs (online DPO makes pairs).
UNPAIRED_LOSS_NAMES = ("kto",)

# `ppo.kl_estimator`: the per-token estimators of KL(π ‖ π_ref) in kl.py.
KL_ESTIMATOR_NAMES = ("k1", "k2", "k3")


@dataclass(frozen=True)
class Estimator:
    """What a `ppo.advantage` estimator is and needs from the run."""

    summary: str  # for `rlhf ppo --dry-run`
    # A critic (value head, value loss, critic learning rate); the others are critic-free.
    needs_critic: bool = False
    # The baseline comes from the other samples of the same prompt: ppo.samples_per_prompt >= 2,
    # and the advantages are not whitened again (the group baseline already centres them).
    group_relative: bool = False


ADVANTAGE_ESTIMATORS: dict[str, Estimator] = {
    "gae": Estimator("generalised advantage estimation from the critic's values", needs_critic=True),
    "grpo": Estimator("each score minus its prompt's mean, over that group's std", group_relative=True),
    "rloo": Estimator("each score minus the mean of its prompt's other samples", group_relative=True),
    "reinforce_pp": Estimator("REINFORCE++: discounted returns, whitened over the batch"),
}

# DAPO / Dr. GRPO. `ppo.loss_aggregation`: how a minibatch's per-token losses become one loss
# (aggregation.py AGGREGATIONS): the mean over all its tokens (PPO, GRPO as trl ships it), the
# mean over responses of each response's token mean (GRPO's paper), or the mean over responses
# of each response's token sum over the constant ppo.max_new_tokens (Dr. GRPO: no length bias).
LOSS_AGGREGATION_NAMES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")
# `ppo.scale_rewards`: what a group-relative advantage (score minus its group's baseline) is
# divided by: the group's std, the whole batch's std, nothing (Dr. GRPO); `auto`: each
# estimator's own (grpo: group, rloo: none). advantages.py REWARD_SCALING.
REWARD_SCALINGS = ("auto", "group", "batch", "none")
# `ppo.overlong`: what a response cut at ppo.max_new_tokens (no EOS) gets: nothing special, zero
# loss weight (DAPO's overlong filtering), or DAPO's soft length penalty (`ppo.overlong_buffer`).
OVERLONG_HANDLINGS = ("none", "mask", "penalty")
