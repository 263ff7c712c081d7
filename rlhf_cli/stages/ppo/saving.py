"""What a PPO run writes: `final/`.

`final/` is the policy adapter (loads with peft against its base) and the tokenizer, with
the critic's value head beside it when there is a critic. With an actor EMA, `final/`
holds the EMA weights and `final-online/` the last online ones.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_file

from ...engine.final_model import strip_prefix
from ...models.quantization import write_quantization_record

VALUE_HEAD = "value_head.safetensors"
ONLINE_SUFFIX = "-online"


def _write_policy(actor, state: dict, tokenizer, final_dir: Path, with_head: bool) -> None:
    """Main process only; written under a temporary name and renamed when complete."""
    tmp = final_dir.with_name(final_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    # Only the policy adapter: the reward/critic adapters are not part of the result.
    actor.save_pretrained(str(tmp), selected_adapters=["default"],
                          state_dict=strip_prefix(state, "actor."), safe_serialization=True)
    tokenizer.save_pretrained(str(tmp))
    write_quantization_record(actor, tmp)  # merge-lora rebuilds the base the adapter saw
    head = {k: v.detach().cpu().contiguous() for k, v in strip_prefix(state, "value_head.").items()}
    if with_head and head:
        save_file(head, str(tmp / VALUE_HEAD))
    shutil.rmtree(final_dir, ignore_errors=True)
    tmp.rename(final_dir)


def save_ppo_final(backend, wrapped, tokenizer, final_dir: Path, ema=None) -> Path:
    state = backend.full_state_dict(wrapped)  # collective under ZeRO-3
    final_dir = Path(final_dir)
    if backend.is_main:
        actor = backend.unwrap(wrapped).actor
        if ema is None:
            _write_policy(actor, state, tokenizer, final_dir, with_head=True)
        else:
            online = final_dir.with_name(final_dir.name + ONLINE_SUFFIX)
            _write_policy(actor, state, tokenizer, online, with_head=False)
            _write_policy(actor, ema.state_dict_for(state), tokenizer, final_dir, with_head=True)
    backend.barrier()
    return final_dir
