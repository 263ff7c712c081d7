"""Writing `final/`: a PEFT adapter (or a full model) plus the tokenizer, atomically."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from pathlib import Path

from ..models.adapters import POLICY
from ..models.quantization import write_quantization_record


def strip_prefix(state: dict, prefix: str) -> dict:
    return {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}


def own_adapter_only(lm) -> dict:
    """peft saves every adapter a model holds unless told otherwise: a frozen judge attached
    for scoring (models/reward_judge.py) is not part of the trained model."""
    return {"selected_adapters": [POLICY]} if POLICY in getattr(lm, "peft_config", {}) else {}


def save_final_model(backend, model, get_lm: Callable, tokenizer, final_dir: Path,
                     prefix: str = "lm.", extra_files: dict[str, str] | None = None) -> Path:
    """Collective. `get_lm(unwrapped)` picks the transformers/peft model to save.

    The state dict comes from the backend, which gathers ZeRO-3 shards when needed; it is
    written under `final.tmp/` and renamed, so `final/` is either complete or absent.
    """
    state = backend.full_state_dict(model)
    if backend.is_main:
        final_dir = Path(final_dir)
        tmp = final_dir.with_name(final_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        lm = get_lm(backend.unwrap(model))
        lm.save_pretrained(str(tmp), state_dict=strip_prefix(state, prefix),
                           safe_serialization=True, **own_adapter_only(lm))
        tokenizer.save_pretrained(str(tmp))
        write_quantization_record(lm, tmp)  # merge-lora rebuilds the base the adapter saw
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        shutil.rmtree(final_dir, ignore_errors=True)
        tmp.rename(final_dir)
    backend.barrier()
    return Path(final_dir)
