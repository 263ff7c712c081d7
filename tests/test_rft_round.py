"""One round's sampling half in process (fast): sampled token ids, their decoded texts and the
scores of a reward model that rides on the policy's base, against the RM loaded on its own."""

from __future__ import annotations

import torch
from cli_helpers import REPO

from rlhf_cli.config import load_recipe
from rlhf_cli.engine.judge import make_judge
from rlhf_cli.models.policy import policy_model, tokenizer_for
from rlhf_cli.stages.rft.round import kept_indices, sample_and_score


def independent_rm(rm_run):
    import json

    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    base = json.loads((rm_run / "final" / "adapter_config.json").read_text())["base_model_name_or_path"]
    classifier = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    return PeftModel.from_pretrained(classifier, str(rm_run / "final")).eval()


def test_samples_are_scored_by_the_rm_on_the_policys_base(rm_run):
    recipe = load_recipe(REPO / "recipes" / "tiny-rft.yaml",
                         ["rft.reward_fn=null", f"rft.reward_model={rm_run}", "rft.samples_per_prompt=3",
                          "rft.sample_batch_size=4", "rft.max_new_tokens=6"], stage="rft")
    tokenizer = tokenizer_for(recipe)
    torch.manual_seed(0)
    lm = policy_model(recipe, announce=False)
    judge = make_judge(None, recipe.rft.reward_model, key_prefix="rft", model_section=recipe.model,
                       tokenizer=tokenizer, policy=lm)
    assert "reward" in lm.peft_config and lm.active_adapter == "default"  # on the policy, not active
    prompts = [{"prompt": f"sort {s} =", "prompt_input_ids": tokenizer(f"sort {s} =")["input_ids"]}
               for s in ("cab", "edcb")]
    samples = sample_and_score(lm, prompts, tokenizer, recipe.rft, judge, torch.device("cpu"))
    assert [e["prompt"] for e in samples.examples] == ["sort cab ="] * 3 + ["sort edcb ="] * 3
    assert samples.responses == tokenizer.batch_decode(samples.response_ids, skip_special_tokens=True)
    rm = independent_rm(rm_run)
    for example, ids, score in zip(samples.examples, samples.response_ids, samples.scores, strict=True):
        assert 1 <= len(ids) <= 6 and tokenizer.eos_token_id not in ids[:-1]  # cut after the first EOS
        full = torch.tensor([example["prompt_input_ids"] + ids])
        with torch.no_grad():
            want = float(rm(input_ids=full, attention_mask=torch.ones_like(full)).logits[0, 0])
        assert abs(score - want) < 1e-4, (score, want)
    best = kept_indices(samples, recipe.rft)
    assert [samples.scores[i] for i in best] == [max(samples.scores[:3]), max(samples.scores[3:])]
