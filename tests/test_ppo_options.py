"""PPO options in process: the ptx loss, the actor EMA, skipped NaN/inf updates, the
dry-run plan. Each against numbers worked by hand or computed another way."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from ppo_helpers import RECIPE, OneProcess, rollout_of

from rlhf_cli.config import load_recipe
from rlhf_cli.engine.bad_steps import BadSteps
from rlhf_cli.engine.checkpoint import load_checkpoint, save_checkpoint
from rlhf_cli.engine.rollout import seed_sampling_stream
from rlhf_cli.errors import UserError
from rlhf_cli.models.arrangement_build import build_arrangement
from rlhf_cli.models.policy import tokenizer_for
from rlhf_cli.stages.ppo import update as update_module
from rlhf_cli.stages.ppo.ema import EMA_FILE, ActorEMA
from rlhf_cli.stages.ppo.experience import make_experience, with_advantages
from rlhf_cli.stages.ppo.guard import diverged
from rlhf_cli.stages.ppo.optim import ppo_optimizer
from rlhf_cli.stages.ppo.plan import ppo_plan
from rlhf_cli.stages.ppo.ptx import PtxBatches
from rlhf_cli.stages.ppo.update import PPOUpdate, minibatch_loss

PTX = ["ppo.ptx_coef=0.3", "ppo.ptx_data=builtin:sort", "ppo.ptx_batch_size=4"]


def recipe_with(*overrides: str):
    return load_recipe(RECIPE, ["ppo.rollout_batch_size=8", "ppo.mini_batch_size=4", "ppo.ppo_epochs=1",
                                "train.lr=1e-2", "model.lora.dropout=0.0", *overrides])


def setup(recipe, seed: int = 0):
    """An arrangement whose actor differs from the base, a rollout with varied scores, and
    the one-process backend of ppo_helpers."""
    tokenizer = tokenizer_for(recipe)
    torch.manual_seed(seed)
    arrangement = build_arrangement(recipe, tokenizer)
    with torch.no_grad():
        for name, param in arrangement.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05)
    rollout = rollout_of(arrangement, recipe, tokenizer)
    scores = torch.linspace(-1.0, 1.0, rollout.input_ids.shape[0])
    optimizer = ppo_optimizer(arrangement, recipe)
    backend = OneProcess(arrangement, optimizer)
    experience = make_experience(arrangement, rollout, scores, recipe.ppo, None)
    experience = with_advantages(experience, recipe.ppo, 0.05, backend)
    return tokenizer, arrangement, experience, backend


def updates(arrangement, recipe, backend, scheduler, **options) -> PPOUpdate:
    """The run's update object (vf_coef 0.1, run seed 0: iteration i shuffles with seed i)."""
    return PPOUpdate(arrangement, recipe.ppo, backend, scheduler, vf_coef=0.1, **options)


# ------------------------------------------------------------------------------- ptx


def test_ptx_data_is_read_as_rlhf_sft_reads_it(rlhf_home):
    from rlhf_cli.data.loaders import load_sft

    recipe = recipe_with(*PTX)
    tokenizer = tokenizer_for(recipe)
    backend = OneProcess(None, None)
    batches = PtxBatches(recipe, tokenizer, backend)
    assert batches.examples == load_sft(recipe, tokenizer, "builtin:sort", "data.train", backend)
    first, again, second = batches(0), batches(0), batches(1)
    assert first["input_ids"].shape[0] == 4
    assert all(torch.equal(first[k], again[k]) for k in first)  # a function of the update number
    assert not torch.equal(first["input_ids"], second["input_ids"])


def test_ptx_loss_is_the_ppo_loss_plus_coef_times_the_sft_loss(rlhf_home):
    recipe = recipe_with(*PTX)
    tokenizer, arrangement, experience, backend = setup(recipe)
    ptx = PtxBatches(recipe, tokenizer, backend)(3)
    rows = experience.select(torch.arange(4))
    assert rows.input_ids.shape[0] == 4 and rows.prompt_width == experience.prompt_width
    assert torch.equal(rows.advantages, experience.advantages[:4])
    arrangement.train()  # LoRA dropout is 0: train mode is deterministic
    with_ptx, stats = minibatch_loss(arrangement, rows, recipe.ppo, 0.1, True, ptx)
    without, plain_stats = minibatch_loss(arrangement, rows, recipe.ppo, 0.1, True)
    # The SFT loss computed independently: the full logits of the policy (adapter on), next-token
    # cross-entropy averaged over the labelled tokens.
    logits = arrangement.actor(input_ids=ptx["input_ids"], attention_mask=ptx["attention_mask"]).logits
    sft = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ptx["labels"][:, 1:].flatten(),
                          ignore_index=-100)
    torch.testing.assert_close(with_ptx, without + 0.3 * sft, rtol=0, atol=1e-6)
    assert stats["ptx_loss"] == pytest.approx(float(sft.detach()), abs=1e-6)
    assert plain_stats["policy_loss"] == stats["policy_loss"] and "ptx_loss" not in plain_stats
    assert float(sft.detach()) > 1.0  # far from zero: a wrong weight could not hide
    # The ptx term trains the policy: its gradient reaches the actor's adapter.
    arrangement.zero_grad()
    (with_ptx - without).backward()
    moved = {n for n, p in arrangement.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert moved and all(n.startswith("actor.") and ".default." in n for n in moved)


def test_ppo_update_feeds_one_ptx_batch_per_update_numbered_over_the_run(rlhf_home):
    recipe = recipe_with(*PTX)
    tokenizer, arrangement, experience, backend = setup(recipe)
    batches = PtxBatches(recipe, tokenizer, backend)
    asked = []

    def recording(update: int) -> dict:
        asked.append(update)
        return batches(update)

    scheduler = torch.optim.lr_scheduler.LambdaLR(backend.optimizer, lambda _: 1.0)
    # Iteration 3 of a run with 2 updates an iteration: its first update is update 6.
    stats = updates(arrangement, recipe, backend, scheduler, updates_per_iteration=2,
                    ptx_batches=recording)(experience, 3)
    assert asked == [6, 7]  # 8 responses / minibatches of 4, one epoch
    assert stats["loss"] == pytest.approx(stats["policy_loss"] + 0.1 * stats["value_loss"]
                                          + 0.3 * stats["ptx_loss"])


# ------------------------------------------------------------------------------- EMA


class Fake(torch.nn.Module):
    """Named like an arrangement: the policy adapter under `actor.` `.default.`, a value head."""

    def __init__(self):
        super().__init__()
        self.actor = torch.nn.ModuleDict({"default": torch.nn.Linear(2, 1, bias=False)})
        self.value_head = torch.nn.Linear(2, 1, bias=False)
        with torch.no_grad():
            self.actor["default"].weight.copy_(torch.tensor([[1.0, 2.0]]))

    def actor_parameters(self):  # as an arrangement lists its policy's weights
        return {"actor.default.weight": self.actor["default"].weight}


def test_ema_by_hand():
    model = Fake()
    ema = ActorEMA(model, 0.75)
    weight = model.actor["default"].weight
    assert list(ema.shadow) == ["actor.default.weight"]  # the value head is not the policy
    with torch.no_grad():
        weight.copy_(torch.tensor([[3.0, 0.0]]))
    ema.update()  # 0.75·[1, 2] + 0.25·[3, 0] = [1.5, 1.5]
    torch.testing.assert_close(ema.shadow["actor.default.weight"], torch.tensor([[1.5, 1.5]]))
    with torch.no_grad():
        weight.copy_(torch.tensor([[1.5, 3.5]]))
    ema.update()  # 0.75·[1.5, 1.5] + 0.25·[1.5, 3.5] = [1.5, 2.0]
    torch.testing.assert_close(ema.shadow["actor.default.weight"], torch.tensor([[1.5, 2.0]]))
    with ema.applied():  # the EMA weights in place, the online ones back afterwards
        assert weight.tolist() == [[1.5, 2.0]]
    assert weight.tolist() == [[1.5, 3.5]]
    state = ema.state_dict_for(model.state_dict())
    assert state["actor.default.weight"].tolist() == [[1.5, 2.0]]
    assert torch.equal(state["value_head.weight"], model.value_head.weight)
    with pytest.raises(ValueError, match="decay"):
        ActorEMA(model, 1.0)


class CheckpointStub:
    """The backend as save_checkpoint/load_checkpoint use it, recording the model's saves and loads."""

    is_main, rank = True, 0

    def __init__(self):
        self.saved = []

    def barrier(self):
        pass

    def save_state(self, directory):
        self.saved.append(directory)

    def load_state(self, directory):
        self.saved.append(("load", directory))


def test_ema_travels_with_the_checkpoint(tmp_path):
    """The runner hands the EMA to the checkpoint as a named part: tensors, in `ema.safetensors`."""
    model = Fake()
    ema = ActorEMA(model, 0.5)
    with torch.no_grad():
        model.actor["default"].weight.add_(1.0)
    ema.update()  # [1.5, 2.5]
    backend = CheckpointStub()
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(model.parameters(), lr=1.0), lambda _: 1.0)
    checkpoint = save_checkpoint(backend, tmp_path, 1, {}, scheduler, keep=1, parts={"ema": ema})
    assert (checkpoint / EMA_FILE).is_file() and len(backend.saved) == 1
    other = ActorEMA(Fake(), 0.5)  # a fresh run: EMA = the initial weights
    assert other.shadow["actor.default.weight"].tolist() == [[1.0, 2.0]]
    load_checkpoint(backend, checkpoint, scheduler, parts={"ema": other})
    assert other.shadow["actor.default.weight"].tolist() == [[1.5, 2.5]]
    assert backend.saved[-1] == ("load", checkpoint)  # the model and optimizer are the backend's


def test_kl_coefficient_travels_with_the_checkpoint(tmp_path):
    """A part whose state is not tensors joins trainer_state.json under its name."""
    from rlhf_cli.algorithms.kl import AdaptiveKLController

    backend = CheckpointStub()
    kl = AdaptiveKLController(0.2, target=6.0, horizon=100)
    kl.update(12.0, 10)  # error clipped to 0.2: 0.2·(1 + 0.2·10/100) = 0.204
    assert kl.value == pytest.approx(0.204)
    scheduler = torch.optim.lr_scheduler.LambdaLR(torch.optim.SGD(Fake().parameters(), lr=1.0), lambda _: 1.0)
    checkpoint = save_checkpoint(backend, tmp_path, 2, {"world_size": 1}, scheduler, keep=1, parts={"kl": kl})
    state = json.loads((checkpoint / "trainer_state.json").read_text())
    assert state == {"world_size": 1, "kl": {"value": kl.value}, "step": 2}
    fresh = AdaptiveKLController(0.2, target=6.0, horizon=100)
    load_checkpoint(backend, checkpoint, scheduler, parts={"kl": fresh})
    assert fresh.value == kl.value


def test_ppo_update_moves_the_ema_after_each_applied_step(rlhf_home):
    recipe = recipe_with("ppo.ema_decay=0.5")
    _, arrangement, experience, backend = setup(recipe)
    ema = ActorEMA(arrangement, 0.5)
    start = {n: t.clone() for n, t in ema.shadow.items()}
    snapshots = []
    real_update = ema.update

    def update():
        snapshots.append({n: p.detach().clone() for n, p in ema.params.items()})
        real_update()

    ema.update = update
    scheduler = torch.optim.lr_scheduler.LambdaLR(backend.optimizer, lambda _: 1.0)
    updates(arrangement, recipe, backend, scheduler, ema=ema)(experience, 0)
    assert len(snapshots) == 2  # two updates
    for name, value in ema.shadow.items():  # ((start/2 + θ1/2)/2 + θ2/2)
        expected = 0.25 * start[name] + 0.25 * snapshots[0][name] + 0.5 * snapshots[1][name]
        torch.testing.assert_close(value, expected)
    assert not ema.shadow.keys() & {n for n, _ in arrangement.named_parameters() if "value_head" in n}


# ------------------------------------------------------------------ NaN/inf updates


def test_bad_updates_count_and_stop_after_max_in_a_row(tmp_path):
    guard = BadSteps(3, True, diverged)
    for bad in (False, True, True, False, True, True):
        guard.record(bad, 2)
    assert guard.state_dict() == {"total": 4, "in_a_row": 2}
    guard.checkpoint = tmp_path / "checkpoints" / "step-1"
    with pytest.raises(UserError) as stopped:
        guard.record(True, 3)
    message = str(stopped.value)
    assert "NaN/inf in 3 updates in a row, the last in iteration 3" in message
    assert "train.max_bad_steps=3" in message
    assert f"the newest checkpoint, {guard.checkpoint}, is kept" in message
    resumed = BadSteps(3, True, diverged)
    resumed.load_state_dict({"total": 4, "in_a_row": 2})
    assert resumed.state_dict() == {"total": 4, "in_a_row": 2}
    with pytest.raises(UserError, match="NaN/inf in iteration 5; .* no checkpoint was saved"):
        BadSteps(3, False, diverged).record(True, 5)  # DeepSpeed: the first one stops


def _poisoned(monkeypatch, bad_calls: set[int], how: str):
    """policy_loss with a NaN loss, or a finite loss with NaN gradients, at the given calls."""
    real, calls = update_module.policy_loss, [0]

    def policy_loss(*args, **kwargs):
        loss, stats = real(*args, **kwargs)
        calls[0] += 1
        if calls[0] in bad_calls:
            # sqrt(0·x) is 0 with an infinite derivative: 0 · inf = NaN gradients.
            loss = loss * float("nan") if how == "loss" else loss + torch.sqrt(loss * 0.0)
        return loss, stats

    monkeypatch.setattr(update_module, "policy_loss", policy_loss)


@pytest.mark.parametrize("how", ["loss", "gradients"])
def test_a_nan_update_is_skipped_and_leaves_weights_moments_and_ema_alone(how, rlhf_home, monkeypatch):
    recipe = recipe_with("ppo.mini_batch_size=8")  # one update per call
    _, arrangement, experience, backend = setup(recipe)
    ema = ActorEMA(arrangement, 0.5)
    guard = BadSteps(3, True, diverged)
    scheduler = torch.optim.lr_scheduler.LambdaLR(backend.optimizer, lambda _: 1.0)
    before = {n: p.detach().clone() for n, p in arrangement.named_parameters()}
    shadow = {n: t.clone() for n, t in ema.shadow.items()}
    _poisoned(monkeypatch, {1}, how)

    update = updates(arrangement, recipe, backend, scheduler, bad_steps=guard, ema=ema)
    assert update(experience, 0) == {}  # nothing applied: no numbers to report
    assert all(torch.equal(p, before[n]) for n, p in arrangement.named_parameters())
    assert backend.optimizer.state_dict()["state"] == {}  # no Adam moments either
    assert all(p.grad is None for p in arrangement.parameters())  # the gradients were dropped
    assert all(torch.equal(t, shadow[n]) for n, t in ema.shadow.items())
    assert scheduler.last_epoch == 1  # the schedule still moved on
    assert guard.state_dict() == {"total": 1, "in_a_row": 1}
    stats = update(experience, 1)  # the next one trains again and resets the run of bad ones
    assert torch.isfinite(torch.tensor(list(stats.values()))).all()
    assert any(not torch.equal(p, before[n]) for n, p in arrangement.named_parameters())
    assert guard.state_dict() == {"total": 1, "in_a_row": 0}


def test_repeated_nan_updates_stop_inside_the_iteration(rlhf_home, monkeypatch):
    recipe = recipe_with("ppo.ppo_epochs=4")  # 8 updates
    _, arrangement, experience, backend = setup(recipe)
    guard = BadSteps(3, True, diverged)
    scheduler = torch.optim.lr_scheduler.LambdaLR(backend.optimizer, lambda _: 1.0)
    _poisoned(monkeypatch, {2, 3, 4, 5, 6}, "loss")
    with pytest.raises(UserError, match="3 updates in a row, the last in iteration 7"):
        updates(arrangement, recipe, backend, scheduler, bad_steps=guard)(experience, 6)
    assert scheduler.last_epoch == 4  # stopped at the third bad update


# -------------------------------------------------------------------------- dry run


def test_the_dry_run_plan_names_the_options():
    plain = "\n".join(ppo_plan(load_recipe(RECIPE)))
    assert "64 prompts, one response each" in plain and "2 epochs x 2 minibatches" in plain
    assert "advantage: gae" in plain and "ptx: off" in plain and "actor EMA: off" in plain
    recipe = load_recipe(RECIPE, ["ppo.advantage=rloo", "ppo.samples_per_prompt=4",
                                  "ppo.rollout_batch_size=16", *PTX, "ppo.ema_decay=0.99"])
    text = "\n".join(ppo_plan(recipe))
    assert "16 prompts x 4 samples = 64 responses" in text
    assert "advantage: rloo" in text and "critic-free: no value head, no value loss" in text
    assert "ptx: + 0.3 x SFT loss on builtin:sort, 4 rows per optimizer step" in text
    assert "actor EMA: decay 0.99; final/ holds the EMA policy" in text


def test_ptx_data_path_is_stored_absolute(tmp_path, monkeypatch):
    data = tmp_path / "sft.jsonl"
    data.write_text('{"prompt": "sort ba =", "response": " ab"}\n')
    monkeypatch.chdir(tmp_path)
    recipe = load_recipe(RECIPE, ["ppo.ptx_coef=0.1", "ppo.ptx_data=sft.jsonl"])
    assert recipe.ppo.ptx_data == str(data) and Path(recipe.ppo.ptx_data).is_absolute()


def test_each_rank_samples_from_its_own_stream_whatever_was_built_before():
    def draws_after(rank: int, built_draws: int = 0) -> torch.Tensor:
        torch.manual_seed(7)  # what the worker does on every rank
        torch.rand(built_draws)  # what building the models drew
        seed_sampling_stream(7, rank)
        return torch.rand(4)

    torch.manual_seed(7)
    weights_stream = torch.rand(4)  # the stream that drew the initial weights
    assert torch.equal(draws_after(0), draws_after(0, built_draws=1000))
    assert not torch.equal(draws_after(0), draws_after(1))
    assert not torch.equal(draws_after(1), draws_after(2))
    assert not torch.equal(draws_after(0), weights_stream)


# ------------------------------------------------------------------- micro-batches


@pytest.mark.parametrize("estimator", [[], ["ppo.advantage=reinforce_pp"]])
def test_micro_batches_accumulate_to_the_same_update(rlhf_home, estimator):
    """mini_batch_size 4 in micro-batches of 1 (and of 2) = one forward of 4: same weights after
    two updates, same logged means (policy, value and ptx losses weighted by token share)."""
    results = {}
    for micro in (None, 2, 1):
        settings = [*PTX, *estimator] + ([f"ppo.micro_batch_size={micro}"] if micro else [])
        recipe = recipe_with(*settings)
        tokenizer, arrangement, experience, backend = setup(recipe)
        # Plain SGD: the weights move by the gradient itself (Adam would amplify rounding in
        # weights whose gradient is ~0, and hide a gradient scaled by a wrong factor).
        backend.optimizer = torch.optim.SGD([p for p in arrangement.parameters() if p.requires_grad], lr=0.5)
        scheduler = torch.optim.lr_scheduler.LambdaLR(backend.optimizer, lambda _: 1.0)
        forwards = []
        arrangement.register_forward_pre_hook(lambda _, args, seen=forwards: seen.append(len(args[0])))
        stats = updates(arrangement, recipe, backend, scheduler,
                        ptx_batches=PtxBatches(recipe, tokenizer, backend))(experience, 0)
        trained = {n: p.detach().clone() for n, p in arrangement.named_parameters() if p.requires_grad}
        results[micro] = (stats, trained, forwards)
    whole_stats, whole, whole_forwards = results[None]
    assert whole_forwards == [4, 4]  # two updates of one forward each
    assert results[2][2] == [2, 2, 2, 2] and results[1][2] == [1] * 8
    assert whole_stats["ptx_loss"] > 1.0 and whole_stats["policy_loss"] != 0
    for micro in (2, 1):
        stats, trained, _ = results[micro]
        assert stats.keys() == whole_stats.keys()
        for key, value in whole_stats.items():
            assert stats[key] == pytest.approx(value, rel=1e-4, abs=1e-6), (micro, key)
        for name, tensor in whole.items():  # sums in another order
            torch.testing.assert_close(trained[name], tensor, rtol=1e-4, atol=1e-6)
    start = setup(recipe_with(*PTX, *estimator))[1]
    moved = max(float((whole[n] - p).abs().max()) for n, p in start.named_parameters() if p.requires_grad)
    assert moved > 1e-3  # the updates moved the weights: equal weights are not just the start


def test_micro_batch_size_must_divide_the_minibatch_and_set_deepspeed_accumulation(tmp_path):
    from rlhf_cli.engine.deepspeed_backend import deepspeed_config

    with pytest.raises(UserError, match="must divide ppo.mini_batch_size"):
        recipe_with("ppo.micro_batch_size=3")
    with pytest.raises(UserError, match="must divide the responses of a rollout"):
        recipe_with("ppo.mini_batch_size=3", "ppo.micro_batch_size=1")
    config = tmp_path / "ds.json"
    config.write_text('{"train_micro_batch_size_per_gpu": "auto", "gradient_accumulation_steps": "auto", '
                      '"train_batch_size": "auto", "zero_optimization": {"stage": 2}}')
    recipe = recipe_with("ppo.micro_batch_size=1", f"launch.deepspeed={config}")
    resolved = deepspeed_config(recipe, world_size=2)
    assert (resolved["train_micro_batch_size_per_gpu"], resolved["gradient_accumulation_steps"],
            resolved["train_batch_size"]) == (1, 4, 8)
    resolved = deepspeed_config(recipe_with(f"launch.deepspeed={config}"), world_size=2)
    assert (resolved["train_micro_batch_size_per_gpu"], resolved["gradient_accumulation_steps"]) == (4, 1)
