"""1base-2lora runs a micro-batch's actor and critic apart (stages/ppo/update.py `_run_passes`):
the actor's forward and backward, then the critic's forward (under its adapter) and backward,
so that only one pass's activations are alive at a time. The update must be the one of the
summed loss of one forward (the order before): the same gradients and, after one AdamW step,
the same weights, to 1e-6 in fp32; with micro-batches, ptx, critic warm-up and gradient
checkpointing too. The reward model is conftest.py's `rm_run`.
"""

from __future__ import annotations

import weakref

import pytest
import torch
from ppo_helpers import OneProcess, ppo_recipe, rollout_of

from rlhf_cli.engine.backend import load_trainable_state, trainable_state
from rlhf_cli.models.arrangement_build import build_arrangement
from rlhf_cli.models.policy import tokenizer_for
from rlhf_cli.stages.ppo.experience import make_experience, with_advantages
from rlhf_cli.stages.ppo.optim import ppo_optimizer
from rlhf_cli.stages.ppo.ptx import PtxBatches
from rlhf_cli.stages.ppo.update import minibatch_update

TOL = 1e-6
PTX = ["ppo.ptx_coef=0.3", "ppo.ptx_data=builtin:sort", "ppo.ptx_batch_size=4"]
CASES = {
    # LoRA dropout on: the dropout masks are drawn in the same order in both (actor, then critic).
    "one micro-batch, dropout": (["model.lora.dropout=0.1"], True),
    "micro-batches of 2, ptx": (["ppo.micro_batch_size=2", *PTX], True),
    "critic warm-up, ptx": ([*PTX], False),
    "gradient checkpointing, micro-batches": (["model.gradient_checkpointing=true", "ppo.micro_batch_size=2"],
                                              True),
}


class Recording(OneProcess):
    """The one-process backend, keeping the gradients each optimizer step applies."""

    def optimizer_step(self) -> float:
        self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters()
                      if p.grad is not None}
        return super().optimizer_step()


def setup(rm_run, *overrides: str):
    recipe = ppo_recipe("1base-2lora", rm_run, "ppo.mini_batch_size=4", *overrides)
    tokenizer = tokenizer_for(recipe)
    torch.manual_seed(0)
    arrangement = build_arrangement(recipe, tokenizer)
    with torch.no_grad():  # a policy unlike the base, a critic unlike the RM adapter it starts from
        for name, param in arrangement.named_parameters():
            if "lora_B" in name and param.requires_grad:
                param.normal_(0, 0.05)
    ro = rollout_of(arrangement, recipe, tokenizer)
    scores = torch.linspace(-1.0, 1.0, ro.input_ids.shape[0])
    backend = OneProcess(arrangement, None)
    experience = with_advantages(make_experience(arrangement, ro, scores, recipe.ppo, None), recipe.ppo,
                                 0.05, backend)
    ptx = PtxBatches(recipe, tokenizer, backend)(0) if recipe.ppo.ptx_coef else None
    return recipe, arrangement, experience, ptx


def one_step(recipe, arrangement, experience, ptx, train_actor: bool, apart: bool, hooks=None):
    """(gradients, weights after the step, logged stats) of one minibatch update from the
    arrangement's current weights, with a fresh optimizer."""
    backend = Recording(arrangement, ppo_optimizer(arrangement, recipe))
    totals: dict[str, float] = {}
    arrangement.train()
    torch.manual_seed(1)  # the same LoRA dropout masks in both orders
    with hooks or torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        applied, _ = minibatch_update(arrangement, experience, torch.arange(4), ptx, recipe.ppo, backend,
                                      1.0, train_actor, totals, critic_apart=apart)
    assert applied
    return backend.grads, trainable_state(arrangement), totals


@pytest.mark.parametrize("case", CASES)
def test_actor_and_critic_apart_give_the_summed_update(case, rm_run, rlhf_home):
    overrides, train_actor = CASES[case]
    recipe, arrangement, experience, ptx = setup(rm_run, *overrides)
    assert arrangement.critic_apart
    start = trainable_state(arrangement)
    together = one_step(recipe, arrangement, experience, ptx, train_actor, apart=False)
    load_trainable_state(arrangement, start)
    apart = one_step(recipe, arrangement, experience, ptx, train_actor, apart=True)
    (grads, weights, stats), (want_grads, want_weights, want_stats) = apart, together
    assert grads.keys() == want_grads.keys()
    assert {n for n in grads if ".critic." in n}
    # During critic warm-up the actor's gradients are dropped before the step (stages/ppo/warmup.py)
    assert bool({n for n in grads if ".default." in n}) == train_actor
    assert any(n.startswith("value_head") for n in grads)
    for name, grad in want_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=0, atol=TOL, msg=name)
    moved = [n for n in want_weights if not torch.equal(want_weights[n], start[n])]
    assert any(".critic." in n for n in moved)  # the step moved the critic
    assert any(".default." in n for n in moved) or not train_actor  # and the actor
    for name, weight in want_weights.items():
        torch.testing.assert_close(weights[name], weight, rtol=0, atol=TOL, msg=name)
    assert stats.keys() == want_stats.keys()
    for key, value in want_stats.items():
        assert stats[key] == pytest.approx(value, rel=0, abs=TOL), key


class SavedBytes:
    """Bytes of the tensors autograd keeps for a backward (the activations), alive at once:
    counted when saved, uncounted when their graph is freed."""

    class _Held:
        def __init__(self, tensor):
            self.tensor = tensor

    def __init__(self):
        self.live = self.peak = 0

    def pack(self, tensor):
        if isinstance(tensor, torch.nn.Parameter):  # the weights themselves: no activation
            return tensor
        held, size = self._Held(tensor), tensor.numel() * tensor.element_size()
        self.live += size
        self.peak = max(self.peak, self.live)
        weakref.finalize(held, self._free, size)
        return held

    def _free(self, size: int) -> None:
        self.live -= size

    @staticmethod
    def unpack(held):
        return held.tensor if isinstance(held, SavedBytes._Held) else held

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


def test_apart_only_one_pass_keeps_its_activations(rm_run, rlhf_home):
    recipe, arrangement, experience, ptx = setup(rm_run)
    start = trainable_state(arrangement)
    peaks = {}
    for apart in (False, True):
        load_trainable_state(arrangement, start)
        saved = SavedBytes()
        one_step(recipe, arrangement, experience, ptx, True, apart, hooks=saved.hooks())
        assert saved.live == 0  # every graph freed by the end of the update
        peaks[apart] = saved.peak
    # Actor and critic run the same body on the same tokens: apart, the peak is about one of
    # the two (measured 0.5x); together it holds both.
    assert peaks[True] < 0.7 * peaks[False], peaks
