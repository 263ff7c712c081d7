"""The names a recipe may choose (schema, read from algorithms/catalog.py without torch) and the
torch registries that implement them stay in step; what the catalog says an algorithm needs
(a critic, a group of samples, a reference) is what its implementation does."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from tensor_helpers import t

from rlhf_cli.algorithms.advantages import GROUP_BASELINES
from rlhf_cli.algorithms.catalog import ADVANTAGE_ESTIMATORS
from rlhf_cli.algorithms.kl import KL_ESTIMATORS
from rlhf_cli.algorithms.ppo import estimate_advantages
from rlhf_cli.algorithms.preference import PREFERENCE_LOSSES, preference_loss
from rlhf_cli.schema import DPOSection, PPOSection


def allowed(section, key: str) -> tuple[str, ...]:
    (spec,) = [f for f in dataclasses.fields(section) if f.name == key]
    return spec.metadata["choices"]


def test_schema_names_are_the_registries():
    assert allowed(DPOSection, "loss_type") == tuple(PREFERENCE_LOSSES)
    assert allowed(PPOSection, "kl_estimator") == tuple(KL_ESTIMATORS)
    assert allowed(PPOSection, "advantage") == tuple(ADVANTAGE_ESTIMATORS)
    assert {n for n, e in ADVANTAGE_ESTIMATORS.items() if e.group_relative} == set(GROUP_BASELINES)
    assert all(cls.name == name for name, cls in PREFERENCE_LOSSES.items())


@pytest.mark.parametrize("name", list(ADVANTAGE_ESTIMATORS))
def test_an_estimator_needs_a_critic_exactly_when_the_catalog_says(name):
    scores, kl, mask = t(1.0, 0.0, 2.0, 0.5), torch.zeros(4, 3), torch.ones(4, 3)
    values = torch.zeros(4, 3)
    advantages, _ = estimate_advantages(name, scores, kl, mask, 0.1, values=values, group_size=2)
    assert advantages.shape == (4, 3) and torch.isfinite(advantages).all()
    if ADVANTAGE_ESTIMATORS[name].needs_critic:
        with pytest.raises(ValueError, match="critic"):
            estimate_advantages(name, scores, kl, mask, 0.1, group_size=2)
    else:  # without values, and the values make no difference
        without, _ = estimate_advantages(name, scores, kl, mask, 0.1, group_size=2)
        assert torch.equal(without, advantages)
    if ADVANTAGE_ESTIMATORS[name].group_relative:  # needs a group: one sample per prompt is refused
        with pytest.raises(ValueError, match="group_size"):
            estimate_advantages(name, scores, kl, mask, 0.1, group_size=1)


@pytest.mark.parametrize("name", [n for n, cls in PREFERENCE_LOSSES.items() if cls.paired])
def test_a_pair_loss_needs_a_reference_exactly_when_it_says(name):
    loss = preference_loss(DPOSection(loss_type=name, beta=0.5))
    pairs = (t(-10.0, -8.0), t(-12.0, -7.0))
    inputs = {"chosen_lengths": t(2, 4), "rejected_lengths": t(4, 2), "chosen_nll": t(1.0, 2.0)}
    if loss.needs_reference:
        with pytest.raises(ValueError, match="reference"):
            loss(*pairs, None, None, **inputs)
        losses, _, _ = loss(*pairs, t(-11.0, -9.0), t(-11.0, -9.0), **inputs)
    else:  # a reference changes nothing
        losses, _, _ = loss(*pairs, None, None, **inputs)
        with_reference = loss(*pairs, t(-11.0, -9.0), t(-11.0, -9.0), **inputs)[0]
        assert torch.equal(losses, with_reference)
    assert losses.shape == (2,) and torch.isfinite(losses).all()
    assert [n for n, cls in PREFERENCE_LOSSES.items() if not cls.needs_reference] == ["simpo", "orpo"]


def test_a_loss_takes_only_its_own_keys():
    assert preference_loss(DPOSection(loss_type="simpo", simpo_gamma=0.7, label_smoothing=0.1)).gamma == 0.7
    assert preference_loss(DPOSection(loss_type="orpo", orpo_lambda=0.3)).orpo_lambda == 0.3
    kto = preference_loss(DPOSection(loss_type="kto", kto_undesirable_weight=2.0))
    assert not kto.paired and kto.needs_reference and kto.undesirable_weight == 2.0
    for name in ("hinge", "ipo", "orpo"):  # no cDPO smoothing for these: refused, not ignored
        with pytest.raises(ValueError, match="label_smoothing applies to sigmoid, robust, simpo"):
            preference_loss(DPOSection(loss_type=name, label_smoothing=0.1))
    # KTO never read it (as before the losses were objects)
    assert preference_loss(DPOSection(loss_type="kto", label_smoothing=0.1)).label_smoothing == 0.0


class CountingObjective(torch.nn.Module):
    """Fixed log-probs per row; counts the reference forwards the stage asks for."""

    def __init__(self):
        super().__init__()
        self.reference_calls = 0

    def forward(self, input_ids, attention_mask, labels, reference: bool = False):
        self.reference_calls += reference
        rows = input_ids[:, 0].float()
        return -rows - (2.0 if reference else 1.0), torch.full_like(rows, 2.0)


@pytest.mark.parametrize("name", ["sigmoid", "simpo"])
def test_the_dpo_step_asks_the_loss_for_a_reference(name):
    from rlhf_cli.stages.dpo import dpo_step_loss

    model = CountingObjective()
    batch = {"input_ids": torch.tensor([[1], [2], [3], [4]]), "attention_mask": torch.ones(4, 1),
             "labels": torch.zeros(4, 1)}
    loss, metrics = dpo_step_loss(model, batch, loss=preference_loss(DPOSection(loss_type=name)))
    assert torch.isfinite(loss) and metrics["logps/chosen"] == -2.0 - 3.0
    assert model.reference_calls == (1 if name == "sigmoid" else 0)
