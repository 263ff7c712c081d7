"""Loading what `rlhf eval` scores: a reward model or a policy with its reference."""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass
from pathlib import Path

import torch

from ...config import load_resolved
from ...engine.run_dir import FINAL, RECIPE
from ...errors import UserError
from ...models.lm_forward import selected_logits, sequence_logprobs
from ...models.loading import load_tokenizer, resolve_base
from ...models.quantization import after_quantized_load, recorded_load_kwargs
from ...models.reward import score_sequences
from ...models.reward_loading import sequence_classifier


@dataclass
class LoadedModel:
    kind: str  # "reward_model" or "policy"
    model: torch.nn.Module
    tokenizer: object
    reference: torch.nn.Module | None = None  # None for an adapter: disable it instead

    def has_adapter(self) -> bool:
        return hasattr(self.model, "disable_adapter")

    @torch.no_grad()
    def rewards(self, input_ids, attention_mask) -> torch.Tensor:
        return score_sequences(self.model, input_ids, attention_mask)

    @contextlib.contextmanager
    def scored(self, reference: bool):
        """The policy, or its reference: `--reference` / the run's base, else the policy with
        its adapter disabled."""
        if not reference:
            yield self.model
        elif self.reference is not None:
            yield self.reference
        else:
            with self.model.disable_adapter():
                yield self.model

    @torch.no_grad()
    def logps(self, input_ids, attention_mask, labels, reference: bool = False) -> torch.Tensor:
        with self.scored(reference) as model:
            return sequence_logprobs(model, input_ids, attention_mask, labels)[0]

    @torch.no_grad()
    def logits_at(self, input_ids, attention_mask, mask, reference: bool = False) -> torch.Tensor:
        """Next-token logits [N, V] (float32) where `mask` [B, T-1] is true: exactly
        `model(...).logits` there, every family's final transform included."""
        with self.scored(reference) as model:
            return selected_logits(model, input_ids, attention_mask, mask)

    def pair_scores(self, batch: dict, beta: float) -> torch.Tensor:
        """Rewards of the stacked chosen/rejected rows, or implicit rewards β·log π/π_ref."""
        if self.kind == "reward_model":
            return self.rewards(batch["input_ids"], batch["attention_mask"])
        args = (batch["input_ids"], batch["attention_mask"], batch["labels"])
        return beta * (self.logps(*args) - self.logps(*args, reference=True))


def _model_dir(source: str) -> Path:
    path = Path(source).expanduser()
    if (path / FINAL).is_dir():
        path = path / FINAL
    if not path.is_dir():
        raise UserError(f"model not found: {source}", where="--model")
    return path


def _is_classifier(config) -> bool:
    return any(a.endswith("ForSequenceClassification") for a in (config.architectures or []))


def _run_base(source: str) -> str | None:
    recipe = Path(source) / RECIPE
    return load_resolved(recipe).model.base if recipe.is_file() else None


def _run_trusts_remote_code(source: str) -> bool:
    """The run's `model.trust_remote_code`: a base that brings its own code (Baichuan) ran it."""
    recipe = Path(source) / RECIPE
    return recipe.is_file() and load_resolved(recipe).model.trust_remote_code


def _load(auto_class, source: str, **kwargs):
    try:
        if auto_class is None:  # a reward model: transformers' classifier or ScoredCausalLM
            return sequence_classifier(source, None, **kwargs)
        model = auto_class.from_pretrained(source, **kwargs)
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load {source}: {str(exc).strip().splitlines()[0]}") from None
    after_quantized_load(model)
    return model


def load_for_eval(source: str, reference: str | None = None) -> LoadedModel:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    path = _model_dir(source)
    trust = _run_trusts_remote_code(source)
    tokenizer = load_tokenizer(str(path), trust)
    adapter_file = path / "adapter_config.json"
    if adapter_file.is_file():
        from peft import PeftModel

        adapter = json.loads(adapter_file.read_text())
        # A run's recipe names the base as training resolved it (`builtin:tiny` is written
        # again if its cache was cleared); a bare adapter directory only has its config.
        run_base = _run_base(source)
        base = resolve_base(run_base) if run_base else adapter["base_model_name_or_path"]
        as_trained = recorded_load_kwargs(path)  # a QLoRA adapter gets its quantized base back
        if adapter.get("task_type") == "SEQ_CLS":
            body = _load(None, base, trust_remote_code=trust, **as_trained)
            model = PeftModel.from_pretrained(body, str(path)).eval()
            return LoadedModel("reward_model", model, tokenizer)
        body = _load(AutoModelForCausalLM, base, trust_remote_code=trust, **as_trained)
        return LoadedModel("policy", PeftModel.from_pretrained(body, str(path)).eval(), tokenizer)
    # trust_remote_code is passed even when False: transformers then refuses at once instead of
    # asking on the terminal.
    config = _load(AutoConfig, str(path), trust_remote_code=trust)
    if _is_classifier(config):
        model = _load(AutoModelForSequenceClassification, str(path), num_labels=1,
                      trust_remote_code=trust).eval()
        return LoadedModel("reward_model", model, tokenizer)
    model = _load(AutoModelForCausalLM, str(path), trust_remote_code=trust).eval()
    reference = reference or _run_base(source)
    if reference is None:
        raise UserError("a full policy model needs a reference to compare with: pass --reference "
                        "(the model it was trained from)", where="--reference")
    ref_model = _load(AutoModelForCausalLM, resolve_base(reference), trust_remote_code=trust).eval()
    return LoadedModel("policy", model, tokenizer, reference=ref_model)
