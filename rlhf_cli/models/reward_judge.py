"""A reward model as a frozen judge of sampled responses (generate, rft, online DPO).

Where the RM is a LoRA adapter trained on the policy's own base, it goes onto the policy as
one more frozen adapter (`reward`) and scores under that adapter with its own head, exactly
as PPO's one-base arrangements score: no second copy of the base in memory. Otherwise (a
full RM, an RM on another base, or a policy without adapters) it is loaded as a separate
frozen sequence classifier, as `rlhf eval` and PPO's `separate` arrangement load it.

Either way the RM scores the policy's token ids, so both must share one vocabulary.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from ..errors import UserError
from ..schema import ModelSection
from .adapters import REWARD, adapter_base, add_rm_adapter, reward_model_dir, same_base, using_adapter
from .heads import linear_head_from, sequence_reward
from .reward import score_sequences

# (input_ids [B, T], attention_mask [B, T]) -> raw scores [B] float32
Scorer = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _rewhere(exc: UserError, where: str) -> UserError:
    message = str(exc).removeprefix(f"{exc.where}: ") if exc.where else str(exc)
    return UserError(message, where=where)


def reward_model_location(source: str, where: str) -> tuple[Path, str]:
    """(directory, `adapter` | `full`) of an RM run or directory; errors name `where`."""
    try:
        return reward_model_dir(source)
    except UserError as exc:
        raise _rewhere(exc, where) from None


def classifier_for(section: ModelSection, source: str, where: str):
    """`source` as a one-label sequence classifier in the recipe's dtype and quantization,
    its head in float32 (as `rlhf rm` trains it)."""
    from .loading import torch_dtype
    from .quantization import quantized_load_kwargs
    from .reward_loading import sequence_classifier

    dtype = torch_dtype(section.dtype)
    try:
        model = sequence_classifier(source, dtype, section.trust_remote_code,
                                    **quantized_load_kwargs(section.quantization, dtype))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot load the reward model {source}: {str(exc).splitlines()[0]}",
                        where=where) from None
    model.score.float()
    return model


def frozen_reward_model(section: ModelSection, rm_dir: Path, rm_kind: str, where: str):
    """The RM as `rlhf eval` loads it (peft on a sequence classifier, or a full one), frozen."""
    if rm_kind == "full":
        model = classifier_for(section, str(rm_dir), where)
    else:
        from peft import PeftModel

        model = PeftModel.from_pretrained(classifier_for(section, adapter_base(rm_dir), where), str(rm_dir))
    return model.eval().requires_grad_(False)


def check_same_tokenizer(rm_dir: Path, tokenizer, trust_remote_code: bool, where: str) -> None:
    """The RM reads the policy's token ids: its tokenizer (where it saved one) must be the same."""
    from transformers import AutoTokenizer

    if not (rm_dir / "tokenizer_config.json").is_file():
        return
    theirs = AutoTokenizer.from_pretrained(str(rm_dir), trust_remote_code=trust_remote_code)
    if theirs.get_vocab() != tokenizer.get_vocab() or theirs.eos_token_id != tokenizer.eos_token_id:
        raise UserError(f"the reward model {rm_dir} uses another tokenizer than the policy; it scores "
                        "the policy's token ids, so both must share one vocabulary", where=where)


def policy_base_name(policy) -> str | None:
    """The base a peft policy was loaded from (the name its adapters record), or None for a
    model without adapters."""
    if not hasattr(policy, "peft_config") or not hasattr(policy, "get_base_model"):
        return None
    return getattr(policy.get_base_model().config, "_name_or_path", None)


def fits_on_policy(policy, rm_dir: Path, rm_kind: str) -> bool:
    """Whether the RM can be a frozen adapter on the policy's own base."""
    base = policy_base_name(policy)
    return rm_kind == "adapter" and base is not None and same_base(rm_dir, base)


def adapter_scorer(policy, rm_dir: Path) -> Scorer:
    """Attach the RM's LoRA to `policy` (the unwrapped peft model) as the frozen adapter
    `reward`; the scorer runs the policy's base under it, in eval mode, without gradients.

    The policy's own adapter stays the active one, so its outputs do not change. Savers
    write only the policy adapter (engine/final_model.py selects it).
    """
    head = linear_head_from(add_rm_adapter(policy, rm_dir, REWARD), False)

    @torch.no_grad()
    def score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        head.to(input_ids.device)
        was_training = policy.training
        policy.eval()  # the adapter's own LoRA dropout off
        try:
            with using_adapter(policy, REWARD):
                return sequence_reward(policy, head, input_ids, attention_mask)
        finally:
            policy.train(was_training)

    return score


def separate_scorer(model) -> Scorer:
    """A frozen RM model, moved to the scored ids' device at its first call."""

    @torch.no_grad()
    def score(input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if next(model.parameters()).device != input_ids.device:
            model.to(input_ids.device)
        return score_sequences(model, input_ids, attention_mask).float()

    return score


def reward_model_scorer(source: str, section: ModelSection, tokenizer, policy=None,
                        where: str = "reward_model") -> Scorer:
    """The scorer of RM `source` for a policy loaded as `section` says: on the policy's base
    where it fits there, otherwise a separate frozen model."""
    rm_dir, rm_kind = reward_model_location(source, where)
    if policy is not None and fits_on_policy(policy, rm_dir, rm_kind):
        return adapter_scorer(policy, rm_dir)
    check_same_tokenizer(rm_dir, tokenizer, section.trust_remote_code, where)
    return separate_scorer(frozen_reward_model(section, rm_dir, rm_kind, where))
