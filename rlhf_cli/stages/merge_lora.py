"""`rlhf merge-lora`: adapter + base -> one standalone Hugging Face model directory.

The result loads with plain transformers (no peft, no rlhf). Before reporting success we
check that the merged model's logits equal the adapter model's on a sample.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch

from ..engine.progress import console
from ..engine.run_dir import FINAL, RECIPE
from ..errors import UserError
from ..models.quantization import after_quantized_load, dequantized, read_quantization_record
from ..models.remote_code import check_trust, code_files

# Merging changes the order of floating-point operations; fp32 stays well inside this.
LOGITS_ATOL = 1e-3
# Files that describe the model's outputs rather than its weights, kept beside the merged
# weights: PPO normalises an RM's scores with reward_stats.json, adapter or merged.
CARRIED_FILES = ("reward_stats.json",)


def find_adapter_dir(source: str) -> Path:
    path = Path(source)
    if not path.exists():
        raise UserError(f"not found: {source}")
    for candidate in (path, path / FINAL):
        if (candidate / "adapter_config.json").is_file():
            return candidate
    if (path / FINAL / "config.json").is_file() or (path / "config.json").is_file():
        raise UserError(f"{source} holds a full model, not a LoRA adapter: nothing to merge "
                        "(it already loads with transformers as it is)")
    raise UserError(f"{source} is neither a run directory with final/ nor a PEFT adapter "
                    "directory (no adapter_config.json)")


def _auto_class(task_type: str | None):
    import transformers

    if task_type == "SEQ_CLS":
        return transformers.AutoModelForSequenceClassification
    return transformers.AutoModelForCausalLM


def _run_trusts_remote_code(adapter_dir: Path) -> bool:
    """`model.trust_remote_code` of the run that trained the adapter (False without a recipe)."""
    from ..config import load_resolved

    recipe = adapter_dir.parent / RECIPE
    return adapter_dir.name == FINAL and recipe.is_file() and load_resolved(recipe).model.trust_remote_code


def _check_classifier_exists(config, base: str) -> None:
    from ..models.reward_loading import has_sequence_classifier

    if not has_sequence_classifier(config):
        raise UserError(f"{base} has no sequence-classification class of its own (its code ships only "
                        "a causal LM), so this reward model cannot become a standalone transformers "
                        "model: use the RM run itself (PPO and `rlhf eval` load its adapter)")


def _load_base(adapter_config: dict, trust_remote_code: bool = False, quantization=None):
    """The adapter's base in fp32; for a QLoRA adapter (`quantization` is the bitsandbytes
    config it was trained under) the base is quantized as in training, then dequantized, so
    the merged weights are the ones the adapter learned against, not the originals."""
    from transformers import AutoConfig

    base = adapter_config.get("base_model_name_or_path")
    if not base:
        raise UserError("adapter_config.json does not name its base model")
    check_trust(base, trust_remote_code, what="the adapter's base")
    try:
        config = AutoConfig.from_pretrained(base, trust_remote_code=trust_remote_code)
    except OSError as exc:
        raise UserError(f"cannot load the adapter's base {base}: {str(exc).splitlines()[0]}") from None
    if getattr(config, "quantization_config", None) is not None:
        raise UserError(f"the base {base} is quantised; merging into quantised weights loses "
                        "precision: merge into the unquantised base instead")
    auto = _auto_class(adapter_config.get("task_type"))
    kwargs = {"dtype": torch.float32, "trust_remote_code": trust_remote_code}
    if adapter_config.get("task_type") == "SEQ_CLS":
        _check_classifier_exists(config, base)
        kwargs["num_labels"] = 1
    if quantization is None:
        return base, auto.from_pretrained(base, **kwargs)
    model = auto.from_pretrained(base, quantization_config=quantization, **kwargs)
    after_quantized_load(model)
    return base, dequantized(model, torch.float32)


def _sample_input(tokenizer, model) -> dict:
    text = "The quick brown fox jumps over the lazy dog. sort dcba ="
    ids = tokenizer(text, return_tensors="pt") if tokenizer is not None else None
    if ids is None:
        vocab = model.config.vocab_size
        return {"input_ids": torch.arange(1, 17).remainder(vocab).unsqueeze(0)}
    return {"input_ids": ids["input_ids"], "attention_mask": ids["attention_mask"]}


def _output_of(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits.float()


def _carry_code(base: str, out: Path) -> None:
    """A base that brings its own code (config.json `auto_map`) needs that code beside the
    merged weights; save_pretrained writes the files the model classes import, and this adds
    any other (a tokenizer's, a helper module's) without replacing what it wrote."""
    for path in code_files(base):
        if not (out / path.name).exists():
            shutil.copy2(path, out / path.name)


def merge_lora(source: str, out: Path, *, overwrite: bool = False) -> Path:
    from peft import PeftModel
    from transformers import AutoTokenizer

    adapter_dir = find_adapter_dir(source)
    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty: pass --overwrite or choose another --out")
    adapter_config = json.loads((adapter_dir / "adapter_config.json").read_text())
    trust_remote_code = _run_trusts_remote_code(adapter_dir)
    base_name, base = _load_base(adapter_config, trust_remote_code, read_quantization_record(adapter_dir))
    tokenizer = None
    if (adapter_dir / "tokenizer_config.json").is_file():
        tokenizer = AutoTokenizer.from_pretrained(adapter_dir, trust_remote_code=trust_remote_code)
    peft_model = PeftModel.from_pretrained(base, str(adapter_dir))
    peft_model.eval()
    inputs = _sample_input(tokenizer, base)
    expected = _output_of(peft_model, inputs)
    merged = peft_model.merge_and_unload()
    if merged.config.pad_token_id is None and tokenizer is not None and tokenizer.pad_token_id is not None:
        # A sequence classifier finds each row's last token from the pad id; without one,
        # plain transformers refuses batches (LLaMA 2 ships no pad token).
        merged.config.pad_token_id = tokenizer.pad_token_id
    got = _output_of(merged, inputs)
    diff = float((expected - got).abs().max())
    if diff > LOGITS_ATOL:
        raise RuntimeError(f"merged model differs from the adapter model (max |Δlogit| {diff:.2e})")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(str(tmp), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(tmp))
    for name in CARRIED_FILES:
        if (adapter_dir / name).is_file():
            shutil.copy2(adapter_dir / name, tmp / name)
    _carry_code(base_name, tmp)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    console.print(f"merged {adapter_dir} into {base_name} -> {out} "
                  f"(max |Δlogit| vs adapter {diff:.1e})", highlight=False, soft_wrap=True)
    return out
