"""`model.dtype: bf16` through every stage and PPO arrangement, on the CPU.

What GPU users pick: the body runs in bfloat16 while what precision depends on stays
float32: per-token log-probs (log-softmax in fp32), their sequence sums, reward and value
head outputs, advantages and returns, and every loss. Each run is a few steps through
`rlhf` in this process (the `in_process` fixture), with spies on the functions that produce
those tensors; each test also checks that the body really ran in bf16, so that it cannot
pass on an fp32 model. The last test bounds the bf16 path's sequence log-prob against the
same bf16 model's own `model(...).logits.float()`.
"""

from __future__ import annotations

import functools
import json
import math

import pytest
import torch
from cli_helpers import REPO

SMALL = ["--set", "model.dtype=bf16", "--set", "data.train=builtin:sort:train:32",
         "--set", "data.eval=null", "--set", "train.eval_every=null", "--set", "train.eval_reward_fn=null",
         "--set", "train.save_every=null", "--set", "train.log_every=1", "--set", "train.batch_size=4",
         "--set", "train.max_steps=2", "--set", "data.max_length=40"]
PPO_SMALL = ["--set", "ppo.rollout_batch_size=4", "--set", "ppo.mini_batch_size=4",
             "--set", "ppo.ppo_epochs=1", "--set", "ppo.max_new_tokens=6"]


class Spy:
    """Records the dtypes of what wrapped functions take and return, keyed by a label."""

    def __init__(self, monkeypatch):
        self.monkeypatch = monkeypatch
        self.seen: dict[str, set[torch.dtype]] = {}

    def note(self, label: str, value) -> None:
        values = value if isinstance(value, (tuple, list)) else [value]
        for i, item in enumerate(values):
            if isinstance(item, torch.Tensor) and item.is_floating_point():
                self.seen.setdefault(f"{label}[{i}]" if len(values) > 1 else label, set()).add(item.dtype)

    def wrap(self, module, name: str, label: str | None = None, args: dict[int, str] | None = None):
        """Patch `module.name`; record its output (and the positional args named in `args`)."""
        original = getattr(module, name)

        @functools.wraps(original)
        def spied(*a, **k):
            for index, arg_label in (args or {}).items():
                self.note(arg_label, a[index])
            out = original(*a, **k)
            self.note(label or name, out)
            return out

        self.monkeypatch.setattr(module, name, spied)

    def assert_dtype(self, label: str, dtype: torch.dtype) -> None:
        assert label in self.seen, f"{label} never computed; seen: {sorted(self.seen)}"
        assert self.seen[label] == {dtype}, (label, self.seen[label])


@pytest.fixture
def spy(monkeypatch):
    return Spy(monkeypatch)


def spy_losses(spy: Spy) -> None:
    """The loss of every Trainer-based stage (sft, rm, dpo, kto), as the loop receives it."""
    from rlhf_cli.engine import loop

    init = loop.Trainer.__init__

    def spied_init(self, recipe, task, *rest, **kw):
        original = task.data.loss_fn

        def loss_fn(model, batch):
            loss, metrics = original(model, batch)
            spy.note("loss", loss)
            return loss, metrics

        task.data.loss_fn = loss_fn
        init(self, recipe, task, *rest, **kw)

    spy.monkeypatch.setattr(loop.Trainer, "__init__", spied_init)


def spy_body(spy: Spy) -> None:
    """The decoder body's last hidden states, however a stage reaches the body (the built-in
    models are LLaMAs): they must be bf16, or the test would pass on an fp32 model."""
    from transformers.models.llama import modeling_llama

    forward = modeling_llama.LlamaModel.forward

    def recorded(self, *args, **kwargs):
        out = forward(self, *args, **kwargs)
        spy.note("hidden", out.last_hidden_state)
        return out

    spy.monkeypatch.setattr(modeling_llama.LlamaModel, "forward", recorded)


def finite_rows(run) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    assert rows
    for row in rows:
        for key, value in row.items():
            if isinstance(value, float):
                assert math.isfinite(value), (key, row)
    return rows


# ------------------------------------------------------------------ sft, rm, dpo family, kto


def test_sft_in_bf16(in_process, spy, tmp_path):
    spy_losses(spy)
    spy_body(spy)
    assert in_process("sft", "--recipe", str(REPO / "recipes" / "tiny-sft.yaml"), "-o", "run", *SMALL) == 0
    assert "loss" in finite_rows(tmp_path / "run")[-1]
    spy.assert_dtype("hidden", torch.bfloat16)
    spy.assert_dtype("loss", torch.float32)


def test_rm_in_bf16(in_process, spy, tmp_path):
    from rlhf_cli.stages import rm

    spy_losses(spy)
    spy_body(spy)
    spy.wrap(rm, "scores_from_states", "reward")  # the name rm.py calls
    spy.wrap(rm, "response_nll", "nll")
    assert in_process("rm", "--recipe", str(REPO / "recipes" / "tiny-rm.yaml"), "-o", "run", *SMALL,
                      "--set", "rm.lm_loss_weight=0.1") == 0
    finite_rows(tmp_path / "run")
    spy.assert_dtype("hidden", torch.bfloat16)
    for label in ("reward", "nll", "loss"):
        spy.assert_dtype(label, torch.float32)


# The default suite keeps one run of each code path; the other losses and the two-model
# arrangements (the same heads and log-prob functions, on more models) run with the slow tests.
SLOW = pytest.mark.slow


@pytest.mark.parametrize("loss_type", ["sigmoid", pytest.param("simpo", marks=SLOW),
                                       pytest.param("kto", marks=SLOW)])
def test_dpo_family_in_bf16(in_process, spy, tmp_path, loss_type):
    from rlhf_cli.stages.dpo import objective

    spy_losses(spy)
    spy_body(spy)
    spy.wrap(objective, "sequence_logprobs", "seq_logp")
    assert in_process("dpo", "--recipe", str(REPO / "recipes" / "tiny-dpo.yaml"), "-o", "run", *SMALL,
                      "--set", f"dpo.loss_type={loss_type}") == 0
    finite_rows(tmp_path / "run")
    spy.assert_dtype("hidden", torch.bfloat16)
    spy.assert_dtype("seq_logp[0]", torch.float32)
    spy.assert_dtype("loss", torch.float32)


# ------------------------------------------------------------------ ppo


def spy_ppo(spy: Spy) -> None:
    from rlhf_cli.models import arrangements
    from rlhf_cli.stages.ppo import experience, update

    spy_body(spy)
    spy.wrap(arrangements, "token_logprobs_and_entropy", "logp")
    apply_head = arrangements.apply_head

    def spied_apply_head(head, states):
        # The value head trains (float32); a reward head keeps its RM's dtype (frozen).
        weight = next(head.parameters())  # the RM's own `score` may be wrapped by peft
        spy.note("value_head" if weight.requires_grad else "reward_head", weight)
        out = apply_head(head, states)
        spy.note("head_out", out)
        return out

    from rlhf_cli.models import lm_forward, reward

    spy.monkeypatch.setattr(arrangements, "apply_head", spied_apply_head)  # values
    spy.monkeypatch.setattr(reward, "apply_head", spied_apply_head)  # rewards (last_token_scores)

    scores_from_states = reward.scores_from_states

    def spied_scores(model, hidden, attention_mask):  # the separate arrangement's reward model
        spy.note("reward_head", next(lm_forward.inner_causal_lm(model).score.parameters()))
        return scores_from_states(model, hidden, attention_mask)

    spy.monkeypatch.setattr(reward, "scores_from_states", spied_scores)
    spy.wrap(update, "policy_loss", "policy_loss", args={0: "new_logp", 1: "old_logp", 2: "advantages"})
    spy.wrap(update, "value_loss", "value_loss", args={0: "values", 2: "returns"})
    spy.wrap(experience, "estimate_advantages", "estimate")


@pytest.mark.parametrize("arrangement, advantage", [
    ("1base-1lora", "gae"), ("1base-2lora", "gae"), pytest.param("2base-2lora", "gae", marks=SLOW),
    pytest.param("separate", "gae", marks=SLOW), ("1base-1lora", "grpo")])
def test_ppo_in_bf16(in_process, spy, tmp_path, rm_run, arrangement, advantage):
    spy_ppo(spy)
    extra = ["--set", f"ppo.advantage={advantage}"]
    if advantage == "gae":  # a reward model: its body and head run in bf16 too
        extra += ["--set", "ppo.reward_fn=null", "--set", f"ppo.reward_model={rm_run}"]
    else:
        extra += ["--set", "ppo.samples_per_prompt=2"]
    code = in_process("ppo", "--recipe", str(REPO / "recipes" / "tiny-ppo-1base-1lora.yaml"), "-o", "run",
                      *SMALL, *PPO_SMALL, "--set", f"ppo.arrangement={arrangement}", *extra)
    assert code == 0
    rows = finite_rows(tmp_path / "run")
    assert "policy_loss" in rows[-1] and rows[-1]["rss_mb"] > 0  # as every stage's rows
    spy.assert_dtype("hidden", torch.bfloat16)
    for label in ("logp[0]", "new_logp", "old_logp", "advantages", "estimate[0]", "policy_loss[0]"):
        spy.assert_dtype(label, torch.float32)
    if advantage == "gae":
        # The reward head too: the RM scores with a float32 head (load_sequence_classifier).
        for label in ("values", "returns", "value_loss[0]", "estimate[1]", "head_out", "value_head",
                      "reward_head"):
            spy.assert_dtype(label, torch.float32)


def test_a_bf16_reward_models_trainable_weights_are_float32(rlhf_home):
    """The score head trains with LoRA; in bf16 AdamW's small late updates would round away
    (bf16 keeps 8 bits of mantissa), so every trainable weight is float32, as peft makes LoRA's."""
    from rlhf_cli.config import load_recipe
    from rlhf_cli.models.policy import tokenizer_for
    from rlhf_cli.models.reward import score_sequences
    from rlhf_cli.stages.rm import reward_model

    recipe = load_recipe(REPO / "recipes" / "tiny-rm.yaml", ["model.dtype=bf16"])
    model = reward_model(recipe, tokenizer_for(recipe), announce=False)
    trainable = {name: p.dtype for name, p in model.named_parameters() if p.requires_grad}
    assert any("score" in name for name in trainable)
    assert set(trainable.values()) == {torch.float32}, trainable
    frozen = {p.dtype for p in model.parameters() if not p.requires_grad}
    assert torch.bfloat16 in frozen  # the body stays bf16
    ids = torch.tensor([[1, 5, 6, 2]])
    assert score_sequences(model, ids, torch.ones_like(ids)).dtype == torch.float32


# ------------------------------------------------------------------ precision


def own_logprobs(model, ids, mask) -> torch.Tensor:
    """log p(next token) [B, T-1] from the model's own logits, upcast, in float32."""
    from rlhf_cli.models.lm_forward import position_ids_from

    logits = model(input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask)).logits
    assert logits.dtype == torch.bfloat16  # the model really is bf16
    return torch.log_softmax(logits[:, :-1].float(), dim=-1).gather(2, ids[:, 1:, None]).squeeze(2)


@pytest.mark.parametrize("lora", [True, False], ids=["lora-frozen-head", "trainable-head"])
def test_bf16_log_probs_match_the_models_own_logits_in_float32(rlhf_home, lora):
    """Sequence sums (DPO, SFT, eval) and PPO's per-token path against log_softmax of the same
    bf16 model's `model(...).logits.float()`.

    Both apply the same bf16 head to the same bf16 hidden states, and the head's output rows do
    not depend on which other rows are in the GEMM here; what remains is float32 reduction order
    (log-sum-exp over the vocabulary, the sum over tokens): at most a few float32 ulps of each
    term. Tolerance: n tokens x 4 ulps of the sum's magnitude (~1e-3 for 30 tokens at ~-180).
    A log-softmax taken in bf16 is off by ~0.1 on these sums (measured), ~100x more; the same
    weights in float32 by ~0.01-0.05, so the bf16 model is what is being checked."""
    from rlhf_cli.config import load_recipe
    from rlhf_cli.models.heads import hidden_states, response_states, token_logprobs_and_entropy
    from rlhf_cli.models.lm_forward import sequence_logprobs
    from rlhf_cli.models.loading import add_lora, load_causal_lm

    recipe = load_recipe(REPO / "recipes" / "tiny-sft.yaml", ["model.dtype=bf16"])
    torch.manual_seed(0)
    model = load_causal_lm(recipe.model)
    if lora:
        model = add_lora(model, recipe.model.lora)
        with torch.no_grad():  # LoRA B starts at 0: make the adapter count
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0, 0.05)
    ids = torch.randint(3, model.config.vocab_size, (3, 40))
    mask = torch.ones_like(ids)
    mask[0, :5] = 0  # left padding in one row
    labels = ids.masked_fill(mask == 0, -100)
    labels[:, :10] = -100  # the prompt
    with torch.no_grad():
        sums, counts = sequence_logprobs(model, ids, mask, labels)
        own = own_logprobs(model, ids, mask)
        width = 10  # PPO: prompt of 10 columns, response of the rest
        states = response_states(hidden_states(model, ids, mask), width)
        ppo_logp, _ = token_logprobs_and_entropy(model, states, ids[:, width:], 1.0, False)
    expected = (own * (labels[:, 1:] != -100)).sum(dim=1)
    assert sums.dtype == ppo_logp.dtype == torch.float32
    ulp = torch.finfo(torch.float32).eps * expected.abs()
    assert torch.all((sums - expected).abs() <= counts * 4 * ulp), (sums, expected)
    token_tol = 4 * torch.finfo(torch.float32).eps * own.abs().max()
    torch.testing.assert_close(ppo_logp, own[:, width - 1:], rtol=0, atol=float(token_tol))
