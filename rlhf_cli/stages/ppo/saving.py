"""`final/` of a PPO run: the policy adapter (loads with peft against its base), the
tokenizer, and the critic's value head beside it."""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

from ..saving import _strip_prefix

VALUE_HEAD = "value_head.safetensors"


def save_ppo_final(backend, wrapped, tokenizer, final_dir: Path) -> Path:
    state = backend.full_state_dict(wrapped)  # collective under ZeRO-3
    final_dir = Path(final_dir)
    if backend.is_main:
        tmp = final_dir.with_name(final_dir.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        actor = backend.unwrap(wrapped).actor
        # Only the policy adapter: the reward/critic adapters are not part of the result.
        actor.save_pretrained(str(tmp), selected_adapters=["default"],
                              state_dict=_strip_prefix(state, "actor."), safe_serialization=True)
        tokenizer.save_pretrained(str(tmp))
        head = {k: v.detach().cpu().contiguous() for k, v in _strip_prefix(state, "value_head.").items()}
        save_file(head, str(tmp / VALUE_HEAD))
        shutil.rmtree(final_dir, ignore_errors=True)
        tmp.rename(final_dir)
    backend.barrier()
    return final_dir
