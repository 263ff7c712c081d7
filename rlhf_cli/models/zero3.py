"""ZeRO-3 helpers: whole weights where partitioned ones cannot be used as they are.

`weights_gathered_once` serves generation (PPO's rollouts, the stages' generation-based
evaluation): sharded weights gathered once, not once per token. `gathered` serves code that
reads or writes a few weights whole (the actor EMA).
"""

from __future__ import annotations

import contextlib

# Marks the gathered weights as in use for the whole generation (ZeRO-3 releases only weights
# that no running module uses); a string never equals a module's integer ds_id.
_GENERATION_USE = "rlhf-generation"


def gathered(params, modifier_rank: int | None = None):
    """Whole weights inside the block, also under ZeRO-3 (collective: every process enters it).

    With `modifier_rank`, what that process writes into them is what every process holds after.
    No-op without ZeRO-3 (no weight has a `ds_id`).
    """
    sharded = [p for p in params if hasattr(p, "ds_id")]
    if not sharded:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(sharded, modifier_rank=modifier_rank)


@contextlib.contextmanager
def weights_gathered_once(model):
    """Under ZeRO-3, all-gather a generation model's sharded weights once for a whole generate().

    Otherwise ZeRO-3's module hooks gather each layer's weights before its forward and
    release them after it: once per generated token (KV-cache decoding runs the whole model
    per token). Gathered here, the hooks find them available and, while they are marked as
    in use, do not release them. The price is one whole copy of the generation model on
    each rank during the rollout. No-op without ZeRO-3 (no weight has a `ds_id`).
    """
    params = [p for p in model.parameters() if hasattr(p, "ds_id") and not getattr(p, "ds_persist", False)]
    if not params:
        yield
        return
    with gathered(params):
        for param in params:
            param.ds_active_sub_modules.add(_GENERATION_USE)
        try:
            yield
        finally:
            for param in params:
                param.ds_active_sub_modules.discard(_GENERATION_USE)
