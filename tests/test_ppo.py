"""PPO arrangements in process, on the built-in tiny model: where each role starts, what a
PPO update may change (only the actor and the critic), and the adapter plumbing under it.

The reward model is built the way `rlhf rm` builds one (a SEQ_CLS LoRA adapter with its
score head) with random non-zero weights, so the reward, critic and reference paths
differ from one another and a mix-up shows.
"""

from __future__ import annotations

import contextlib
import json
import math
import shutil
from pathlib import Path

import pytest
import torch

from rlhf_cli.config import load_recipe
from rlhf_cli.data.prompt_data import build_prompt_dataset
from rlhf_cli.data.sources import load_source
from rlhf_cli.errors import UserError
from rlhf_cli.models.loading import load_causal_lm
from rlhf_cli.stages.common import tokenizer_for
from rlhf_cli.stages.ppo.adapters import CRITIC, REWARD, active_adapters, adapters_disabled, using_adapter
from rlhf_cli.stages.ppo.build import build_arrangement
from rlhf_cli.stages.ppo.experience import build_experience
from rlhf_cli.stages.ppo.heads import hidden_states, response_states, token_logprobs_and_entropy
from rlhf_cli.stages.ppo.optim import ppo_optimizer
from rlhf_cli.stages.ppo.rollout import response_mask_of, sample
from rlhf_cli.stages.ppo.update import ppo_update

REPO = Path(__file__).resolve().parent.parent
RECIPE = REPO / "recipes" / "tiny-ppo-1base-1lora.yaml"
ARRANGEMENTS = ("1base-1lora", "1base-2lora", "2base-2lora", "separate")
# Where the trainable parameters live: (actor prefix, critic prefixes).
TRAINABLE = {
    "1base-1lora": {"actor/default", "value_head"},
    "1base-2lora": {"actor/default", "actor/critic", "value_head"},
    "2base-2lora": {"actor/default", "rm_body/critic", "value_head"},
    "separate": {"actor/default", "critic/default", "value_head"},
}


# --------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def rm_run(rlhf_home, tmp_path_factory) -> Path:
    """An RM run directory on builtin:tiny: final/ holds the adapter, head and tokenizer."""
    from rlhf_cli.stages.rm import reward_model

    recipe = load_recipe(REPO / "recipes" / "tiny-rm.yaml", ["model.lora.dropout=0.3"])
    tokenizer = tokenizer_for(recipe)
    torch.manual_seed(0)
    model = reward_model(recipe, tokenizer, announce=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name or "score" in name:
                param.normal_(0, 0.05)
    run = tmp_path_factory.mktemp("rm_run")
    model.save_pretrained(str(run / "final"))
    tokenizer.save_pretrained(str(run / "final"))
    return run


def ppo_recipe(arrangement: str, rm_run: Path | None, *extra: str):
    reward = (["ppo.reward_fn=null", f"ppo.reward_model={rm_run}"] if rm_run is not None else [])
    return load_recipe(RECIPE, [f"ppo.arrangement={arrangement}", "ppo.rollout_batch_size=8",
                                "ppo.mini_batch_size=4", "ppo.ppo_epochs=1", "train.lr=1e-2",
                                *reward, *extra])


def rollout_of(arrangement, recipe, tokenizer, n: int = 8, seed: int = 0):
    rows = load_source(recipe.data.train, "prompts")[:n]
    examples, _ = build_prompt_dataset(rows, tokenizer, recipe.data.template, 36, "builtin:sort")
    torch.manual_seed(seed)
    return sample(arrangement, examples, tokenizer, recipe.ppo, torch.device("cpu"))


def base_logprobs(recipe, ro) -> torch.Tensor:
    base = load_causal_lm(recipe.model).eval().requires_grad_(False)  # frozen, as the reference is
    with torch.no_grad():
        states = response_states(hidden_states(base, ro.input_ids, ro.attention_mask), ro.prompt_width)
        return token_logprobs_and_entropy(base, states, ro.tokens, recipe.ppo.temperature, False)[0]


def rm_own_scores(rm_run: Path, input_ids, attention_mask) -> torch.Tensor:
    """The RM scored as `rlhf eval` loads and scores it (peft on a sequence classifier)."""
    from rlhf_cli.stages.eval_models import load_for_eval

    return load_for_eval(str(rm_run)).rewards(input_ids, attention_mask)


def trainable_groups(arrangement) -> set[str]:
    groups = set()
    for name, param in arrangement.named_parameters():
        if param.requires_grad:
            adapter = f"/{name.split('.lora_')[1].split('.')[1]}" if ".lora_" in name else ""
            groups.add(name.split(".")[0] + adapter)
    return groups


def flags(module) -> dict[str, bool]:
    return {name: p.requires_grad for name, p in module.named_parameters()}


class OneProcess:
    """The slice of the engine's Backend that PPO's update uses, for one process."""

    world_size, rank, is_main, device = 1, 0, True, torch.device("cpu")
    can_skip_steps, skipped_step = True, False

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def autocast(self):
        return contextlib.nullcontext()

    def accumulating(self, more_to_come: bool):
        return contextlib.nullcontext()

    def backward(self, loss):
        loss.backward()

    def optimizer_step(self) -> float:
        params = [p for p in self.model.parameters() if p.requires_grad]
        norm = float(torch.nn.utils.clip_grad_norm_(params, 1.0))
        self.skipped_step = not math.isfinite(norm)
        if not self.skipped_step:
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm

    def skip_step(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def all_reduce_sum(self, value):
        return value


# ------------------------------------------------------------------- where roles start


@pytest.mark.parametrize("kind", ARRANGEMENTS)
def test_roles_start_where_the_design_says(kind, rm_run):
    recipe = ppo_recipe(kind, rm_run)
    tokenizer = tokenizer_for(recipe)
    arrangement = build_arrangement(recipe, tokenizer)
    assert trainable_groups(arrangement) == TRAINABLE[kind]
    ro = rollout_of(arrangement, recipe, tokenizer)
    arrangement.train()  # the role methods must switch dropout off themselves
    args = (ro.input_ids, ro.attention_mask, ro.prompt_width, ro.tokens)

    # The reference is the base model exactly; the fresh actor LoRA (B = 0) equals it: KL 0.
    reference = arrangement.reference_logprobs(*args)
    assert torch.equal(reference, base_logprobs(recipe, ro))
    arrangement.eval()
    with torch.no_grad():
        logp, values, _ = arrangement(*args)
    assert torch.equal(logp, reference)

    # The reward is the RM's own score (dropout 0.3 in the RM adapter: eval mode matters).
    arrangement.train()
    scores = arrangement.reward_scores(ro.input_ids, ro.attention_mask)
    torch.testing.assert_close(scores, rm_own_scores(rm_run, ro.input_ids, ro.attention_mask),
                               rtol=0, atol=1e-6)
    assert scores.std() > 0

    # The critic starts from the RM: V before the first response token = RM(prompt).
    rm_head = arrangement.reward_head.weight if arrangement.reward_head is not None else None
    if kind == "1base-1lora":  # the shared adapter is the policy's: only the head comes from the RM
        assert torch.equal(arrangement.value_head.weight, rm_head.float())
    else:
        prompt_only = ro.attention_mask.clone()
        prompt_only[:, ro.prompt_width:] = 0
        torch.testing.assert_close(values[:, 0], rm_own_scores(rm_run, ro.input_ids, prompt_only),
                                   rtol=0, atol=1e-5)


@pytest.mark.parametrize("kind", ARRANGEMENTS)
def test_reward_function_runs_start_from_the_policy_base(kind, rlhf_home):
    recipe = ppo_recipe(kind, None)
    tokenizer = tokenizer_for(recipe)
    arrangement = build_arrangement(recipe, tokenizer)
    assert trainable_groups(arrangement) == TRAINABLE[kind]
    assert torch.count_nonzero(arrangement.value_head.weight) == 0
    ro = rollout_of(arrangement, recipe, tokenizer)
    args = (ro.input_ids, ro.attention_mask, ro.prompt_width, ro.tokens)
    reference = arrangement.reference_logprobs(*args)
    arrangement.eval()
    with torch.no_grad():
        logp, values, _ = arrangement(*args)
    assert torch.equal(logp, reference) and torch.equal(reference, base_logprobs(recipe, ro))
    assert torch.count_nonzero(values) == 0
    with pytest.raises(UserError, match="no reward model"):
        arrangement.reward_scores(ro.input_ids, ro.attention_mask)


# ------------------------------------------------------------- what an update may change


@pytest.mark.parametrize("kind", ARRANGEMENTS)
def test_update_trains_actor_and_critic_only(kind, rm_run):
    recipe = ppo_recipe(kind, rm_run)
    tokenizer = tokenizer_for(recipe)
    arrangement = build_arrangement(recipe, tokenizer)
    before_flags = flags(arrangement)
    before = {n: p.detach().clone() for n, p in arrangement.named_parameters()}
    ro = rollout_of(arrangement, recipe, tokenizer)
    args = (ro.input_ids, ro.attention_mask, ro.prompt_width, ro.tokens)
    scores = arrangement.reward_scores(ro.input_ids, ro.attention_mask)
    reference = arrangement.reference_logprobs(*args)

    optimizer = ppo_optimizer(arrangement, recipe)
    backend = OneProcess(arrangement, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    for iteration in range(2):  # the second one sees non-zero LoRA B, so every LoRA A moves too
        experience = build_experience(arrangement, ro, scores, recipe.ppo, 0.05, backend, None)
        ppo_update(arrangement, experience, recipe.ppo, backend, scheduler, vf_coef=1.0,
                   train_actor=True, seed=iteration)

    assert flags(arrangement) == before_flags  # nothing frozen or unfrozen on the way
    changed = {n for n, p in arrangement.named_parameters() if not torch.equal(p, before[n])}
    trainable = {n for n, flag in before_flags.items() if flag}
    assert changed == trainable
    # The reward and the reference do not move; the actor and the critic do.
    assert torch.equal(arrangement.reward_scores(ro.input_ids, ro.attention_mask), scores)
    torch.testing.assert_close(scores, rm_own_scores(rm_run, ro.input_ids, ro.attention_mask),
                               rtol=0, atol=1e-6)
    assert torch.equal(arrangement.reference_logprobs(*args), reference)
    new_experience = build_experience(arrangement, ro, scores, recipe.ppo, 0.05, backend, None)
    assert new_experience.kl_per_response.abs().sum() > 0
    assert not torch.equal(new_experience.old_values, experience.old_values)


# ------------------------------------------------------------ critic-free estimators


@pytest.mark.parametrize("kind", ["1base-1lora", "2base-2lora", "separate"])
def test_critic_free_arrangements_train_the_actor_alone(kind, rm_run):
    recipe = ppo_recipe(kind, rm_run, "ppo.advantage=grpo", "ppo.samples_per_prompt=2")
    tokenizer = tokenizer_for(recipe)
    arrangement = build_arrangement(recipe, tokenizer)
    # No value head, no critic adapter or model, one optimizer group.
    assert trainable_groups(arrangement) == {"actor/default"}
    assert arrangement.value_head is None and not arrangement.has_critic
    names = [name for name, _ in arrangement.named_parameters()]
    assert not any(f".{CRITIC}." in n or n.startswith(("critic.", "value_head")) for n in names)
    optimizer = ppo_optimizer(arrangement, recipe)
    assert len(optimizer.param_groups) == 1

    ro = rollout_of(arrangement, recipe, tokenizer)
    args = (ro.input_ids, ro.attention_mask, ro.prompt_width, ro.tokens)
    reference = arrangement.reference_logprobs(*args)
    assert torch.equal(reference, base_logprobs(recipe, ro))
    arrangement.eval()
    with torch.no_grad():
        logp, values, _ = arrangement(*args)
    assert torch.equal(logp, reference) and values is None
    scores = arrangement.reward_scores(ro.input_ids, ro.attention_mask)
    torch.testing.assert_close(scores, rm_own_scores(rm_run, ro.input_ids, ro.attention_mask),
                               rtol=0, atol=1e-6)

    before = {n: p.detach().clone() for n, p in arrangement.named_parameters()}
    backend = OneProcess(arrangement, optimizer)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    experience = build_experience(arrangement, ro, scores, recipe.ppo, 0.05, backend, None)
    assert experience.old_values is None and experience.advantages.abs().sum() > 0
    stats = ppo_update(arrangement, experience, recipe.ppo, backend, scheduler, vf_coef=1.0,
                       train_actor=True, seed=0)
    # Metrics say nothing about a critic that does not exist.
    assert not {"value_loss", "vf_clip_frac", "explained_variance"} & stats.keys()
    assert stats["loss"] == stats["policy_loss"]
    changed = {n for n, p in arrangement.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith("actor.") and ".default." in n for n in changed)
    assert torch.equal(arrangement.reward_scores(ro.input_ids, ro.attention_mask), scores)
    assert torch.equal(arrangement.reference_logprobs(*args), reference)


@pytest.mark.parametrize("kind", ["1base-1lora", "separate"])
def test_critic_free_with_a_reward_function(kind, rlhf_home):
    recipe = ppo_recipe(kind, None, "ppo.advantage=rloo", "ppo.samples_per_prompt=2")
    arrangement = build_arrangement(recipe, tokenizer_for(recipe))
    assert trainable_groups(arrangement) == {"actor/default"} and arrangement.value_head is None


@pytest.mark.parametrize("overrides, text", [
    (["ppo.advantage=grpo"], "ppo.samples_per_prompt: grpo compares several samples"),
    (["ppo.advantage=rloo", "ppo.samples_per_prompt=1"], "rloo compares several samples"),
    (["ppo.advantage=grpo", "ppo.samples_per_prompt=2", "ppo.arrangement=1base-2lora"],
     "1base-2lora's second adapter is the critic"),
    (["ppo.advantage=reinforce_pp", "ppo.arrangement=2base-2lora"], "second base would hold nothing"),
    (["ppo.advantage=reinforce_pp", "ppo.critic_warmup_steps=2"], "trains no critic to warm up"),
    (["ppo.advantage=a2c"], "is not one of gae, grpo, rloo, reinforce_pp"),
    (["ppo.ptx_coef=0.1"], "set `ppo.ptx_data`"),
    (["ppo.ptx_coef=-0.1"], "must be >= 0"),
    (["ppo.ema_decay=1"], "must be below 1"),
    (["ppo.ema_decay=0"], "must be > 0"),
])
def test_option_combinations_that_make_no_sense_are_refused(overrides, text):
    with pytest.raises(UserError, match=text):
        load_recipe(RECIPE, overrides)


def test_critic_free_2base_and_separate_with_a_reward_model_are_accepted(rm_run):
    for kind in ("2base-2lora", "separate"):
        recipe = ppo_recipe(kind, rm_run, "ppo.advantage=reinforce_pp")
        assert recipe.ppo.arrangement == kind


def test_checkpointed_critic_recomputes_under_its_own_adapter(rm_run):
    """1base-2lora runs the critic under another adapter inside the forward; gradient
    checkpointing must recompute it under that adapter too (same gradients as without)."""

    def gradients(checkpointing: bool) -> dict[str, torch.Tensor]:
        recipe = ppo_recipe("1base-2lora", rm_run, f"model.gradient_checkpointing={checkpointing}",
                            "model.lora.dropout=0.0")
        tokenizer = tokenizer_for(recipe)
        torch.manual_seed(0)
        arrangement = build_arrangement(recipe, tokenizer)
        with torch.no_grad():  # a policy adapter unlike the critic's
            for name, param in arrangement.named_parameters():
                if "lora_B.default" in name:
                    param.normal_(0, 0.05)
        ro = rollout_of(arrangement, recipe, tokenizer, n=4)
        arrangement.train()
        logp, values, _ = arrangement(ro.input_ids, ro.attention_mask, ro.prompt_width, ro.tokens)
        (logp.sum() + values.sum()).backward()
        return {n: p.grad for n, p in arrangement.named_parameters() if p.grad is not None}

    plain, checkpointed = gradients(False), gradients(True)
    assert plain.keys() == checkpointed.keys()
    assert any(f".{CRITIC}." in name for name in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], msg=name)


# --------------------------------------------------------------------- adapter plumbing


def test_using_adapter_switches_routing_and_keeps_flags(rm_run):
    recipe = ppo_recipe("1base-2lora", rm_run)
    arrangement = build_arrangement(recipe, tokenizer_for(recipe))
    actor = arrangement.actor
    before = flags(actor)
    ids = torch.tensor([[1, 70, 71, 72, 73]])
    actor.eval()
    with torch.no_grad():
        policy = actor(input_ids=ids).logits
        with using_adapter(actor, REWARD):
            assert active_adapters(actor) == [REWARD] and flags(actor) == before
            reward = actor(input_ids=ids).logits
        assert active_adapters(actor) == ["default"] and flags(actor) == before
        assert torch.equal(actor(input_ids=ids).logits, policy) and not torch.equal(reward, policy)
        with pytest.raises(RuntimeError), using_adapter(actor, CRITIC):
            raise RuntimeError("inside")
    assert active_adapters(actor) == ["default"] and flags(actor) == before


def test_disabling_adapters_keeps_a_second_adapter_trainable(rm_run):
    """peft's disable_adapter re-enables only the active adapter: the critic would freeze."""
    recipe = ppo_recipe("1base-2lora", rm_run)
    arrangement = build_arrangement(recipe, tokenizer_for(recipe))
    before = flags(arrangement.actor)
    assert any(flag for name, flag in before.items() if f".{CRITIC}." in name)
    with adapters_disabled(arrangement.actor):
        pass
    assert flags(arrangement.actor) == before


def test_rm_from_another_base_is_a_user_error(rm_run, tmp_path):
    other = tmp_path / "other-base"  # the same weights under another name: still refused
    shutil.copytree(Path(json.loads((rm_run / "final" / "adapter_config.json").read_text())
                         ["base_model_name_or_path"]), other)
    for kind in ("1base-1lora", "1base-2lora"):
        recipe = ppo_recipe(kind, rm_run, f"model.base={other}")
        with pytest.raises(UserError, match="was trained on .* one-base arrangements need the same base"):
            build_arrangement(recipe, tokenizer_for(recipe))
    recipe = ppo_recipe("2base-2lora", rm_run, f"model.base={other}")
    assert build_arrangement(recipe, tokenizer_for(recipe)).name == "2base-2lora"


# ------------------------------------------------------------------------------ rollout


def test_response_mask_covers_up_to_the_first_eos():
    eos = 2
    tokens = torch.tensor([
        [5, 2, 7, 2],  # EOS second: it counts, everything after it does not
        [5, 6, 7, 8],  # no EOS: all of it counts, and the row has not ended
        [2, 2, 9, 9],  # EOS first
        [5, 6, 7, 2],  # EOS last
    ])
    mask, ended = response_mask_of(tokens, eos)
    assert mask.tolist() == [[1, 1, 0, 0], [1, 1, 1, 1], [1, 0, 0, 0], [1, 1, 1, 1]]
    assert ended.tolist() == [True, False, True, True]


def test_rollout_samples_from_the_policy_not_the_generation_config(rlhf_home):
    """A model's generation_config (LLaMA 2 ships temperature 0.6, top_p 0.9) must not
    change what PPO samples: here top_k = 1 would make every sample greedy."""
    recipe = ppo_recipe("1base-1lora", None)
    tokenizer = tokenizer_for(recipe)
    arrangement = build_arrangement(recipe, tokenizer)
    arrangement.actor.generation_config.top_k = 1
    arrangement.actor.generation_config.temperature = 0.05
    rows = [{"prompt": "sort dcba ="}] * 8
    examples, _ = build_prompt_dataset(rows, tokenizer, "plain", 36, "test")
    torch.manual_seed(0)
    ro = sample(arrangement, examples, tokenizer, recipe.ppo, torch.device("cpu"))
    assert len({tuple(row.tolist()) for row in ro.tokens}) > 1
    # Layout: left-padded prompt | response, masked after the first EOS, pad there.
    assert ro.input_ids.shape[1] == ro.prompt_width + ro.tokens.shape[1]
    assert torch.equal(ro.attention_mask[:, ro.prompt_width:], ro.response_mask.long())
    assert (ro.tokens[ro.response_mask == 0] == tokenizer.pad_token_id).all()
