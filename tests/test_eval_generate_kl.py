"""`rlhf eval --generate`'s KL in process, on tiny random models: the exact KL of the
distributions sampled from (π/T and π_ref/T, per token over the whole vocabulary, summed
along each response, mean over responses), checked against a sum over the vocabulary done
here from `model(...).logits` in float64.

Two set-ups: Gemma 2 (a logit soft-cap the KL must go through) with a separate reference
model, and LLaMA with a random LoRA adapter whose reference is the adapter disabled.
"""

from __future__ import annotations

import pytest
import torch
from families import build_family
from peft import LoraConfig, get_peft_model

from rlhf_cli.builtin.tokenizer import BOS_ID, build_tokenizer
from rlhf_cli.stages.evaluate import EvalSettings
from rlhf_cli.stages.evaluate.generate import generation_report, response_kl
from rlhf_cli.stages.evaluate.loaded import LoadedModel
from rlhf_cli.stages.evaluate.report import write_markdown

PROMPT = "sort dcba ="


def loaded_model(setup: str) -> LoadedModel:
    tokenizer = build_tokenizer()
    if setup == "gemma2, reference model":
        policy = build_family("gemma2")
        head = policy.get_output_embeddings().weight
        with torch.no_grad():  # another draw of the (tied) head: a policy far from the reference
            head.copy_(torch.randn(head.shape, generator=torch.Generator().manual_seed(7)) * head.std())
        return LoadedModel("policy", policy, tokenizer, reference=build_family("gemma2"))
    config = LoraConfig(r=4, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"],
                        init_lora_weights=False)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        policy = get_peft_model(build_family("llama"), config).eval()
    return LoadedModel("policy", policy, tokenizer)


@torch.no_grad()
def by_hand(loaded: LoadedModel, ids: list[int], first: int, temperature: float) -> float:
    """Σ_{t ≥ first} Σ_v p_v (log p_v − log q_v), p and q the softmax of logits/T at position t−1."""
    input_ids = torch.tensor([ids])
    policy = loaded.model(input_ids=input_ids).logits[0].double()
    if loaded.reference is not None:
        reference = loaded.reference(input_ids=input_ids).logits[0].double()
    else:
        with loaded.model.disable_adapter():
            reference = loaded.model(input_ids=input_ids).logits[0].double()
    total = 0.0
    for t in range(first, len(ids)):
        p = torch.softmax(policy[t - 1] / temperature, dim=-1)
        q = torch.softmax(reference[t - 1] / temperature, dim=-1)
        total += float((p * (p.log() - q.log())).sum())
    return total


SETUPS = ["gemma2, reference model", "llama, LoRA disabled"]


@pytest.mark.parametrize("temperature", [0.5, 1.0, 0.0])
@pytest.mark.parametrize("setup", SETUPS)
def test_one_token_answers_report_the_exact_kl_of_the_sampled_distributions(setup, temperature, tmp_path):
    """One-token answers to one prompt: every response's KL is the KL of the first
    next-token distributions, whichever token was drawn (at T=0: the T=1 distributions)."""
    loaded = loaded_model(setup)
    prompt = [BOS_ID, *loaded.tokenizer.encode(PROMPT, add_special_tokens=False)]
    answer = loaded.tokenizer.encode(" a", add_special_tokens=False)
    examples = [{"prompt": PROMPT, "chosen_input_ids": prompt + answer,
                 "chosen_labels": [-100] * len(prompt) + answer}] * 8
    settings = EvalSettings(num_prompts=8, max_new_tokens=1, temperature=temperature, batch_size=4)
    report = generation_report(loaded, examples, settings, lambda texts, seqs, responses: [0.0] * len(texts))
    expected = by_hand(loaded, [*prompt, 0], len(prompt), temperature or 1.0)
    assert expected > 0.05  # policy and reference really differ
    assert report["kl"] == pytest.approx(expected, rel=1e-4, abs=1e-6)
    definition = report["kl_definition"]
    assert "exact KL" in definition and "summed over the vocabulary" in definition
    along = "greedy responses (T=0): the T=1 distributions" if temperature == 0 else f"at T={temperature:g}"
    assert along in definition

    # The Markdown report says which KL it is.
    out = tmp_path / "report.md"
    write_markdown(out, {"model": "m", "data": "d", "num_pairs": 1, "kind": "policy", "accuracy": 1.0,
                         "generation": report}, [])
    assert f"generation/kl: {definition}." in out.read_text()


@pytest.mark.parametrize("setup", SETUPS)
def test_longer_responses_sum_the_exact_kl_over_their_tokens(setup):
    """Responses of different lengths, padded together: each one's KL is the sum over its
    labelled tokens of the full-vocabulary KL at T."""
    loaded = loaded_model(setup)
    encode = lambda text: loaded.tokenizer.encode(text, add_special_tokens=False)  # noqa: E731
    rows = [(f"sort {w} =", f" {''.join(sorted(w))}") for w in ("dcba", "zy", "qpomn")]
    sequences, hand = [], []
    for prompt_text, answer_text in rows:
        prompt = [BOS_ID, *encode(prompt_text)]
        answer = [*encode(answer_text), loaded.tokenizer.eos_token_id]
        sequences.append({"input_ids": prompt + answer, "labels": [-100] * len(prompt) + answer})
        hand.append(by_hand(loaded, prompt + answer, len(prompt), 0.5))
    got = response_kl(loaded, sequences, batch_size=2, temperature=0.5)
    assert got == pytest.approx(hand, rel=1e-4, abs=1e-6)


def test_sampling_ignores_the_models_generation_config():
    """The sampled distribution is softmax(logits/T) even when the model's generation_config
    asks for top-k 1 or a repetition penalty: eval pins them."""
    loaded = loaded_model("llama, LoRA disabled")
    loaded.model.generation_config.top_k = 1
    loaded.model.generation_config.repetition_penalty = 5.0
    prompt = [BOS_ID, *loaded.tokenizer.encode(PROMPT, add_special_tokens=False)]
    from rlhf_cli.engine.sampling import generate

    torch.manual_seed(0)
    responses = generate(loaded.model, [prompt] * 32, loaded.tokenizer, 1, do_sample=True, temperature=1.0)
    assert len({tuple(r) for r in responses}) > 1


def test_exact_kl_a_chunk_of_rows_at_a_time(monkeypatch):
    """Chunked over rows (as for a large vocabulary) it is the same sum, row by row."""
    from rlhf_cli.algorithms import kl

    generator = torch.Generator().manual_seed(0)
    logits, ref_logits = (torch.randn(7, 11, generator=generator) * 3 for _ in range(2))
    p, q = (torch.softmax(x.double() / 0.7, dim=-1) for x in (logits, ref_logits))
    expected = (p * (p.log() - q.log())).sum(dim=-1).float()
    monkeypatch.setattr(kl, "_KL_CHUNK_BYTES", 4 * 11 * 3)  # 3 rows a chunk
    torch.testing.assert_close(kl.exact_kl(logits, ref_logits, 0.7), expected, rtol=1e-5, atol=1e-6)
