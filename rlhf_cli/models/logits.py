"""One definition of next-token logits: whatever `model(...).logits` returns.

Our fast paths run the decoder body, apply the output head to the selected rows only, then
the family's final transform (`LogitTransform`: Cohere multiplies by `logit_scale`, Granite
divides by `logits_scaling`, Gemma 2/3 soft-cap with c·tanh(u/c)). Whether that reproduces
the model is not assumed from attribute names: `head_path` runs one short probe through
`model(...).logits` and through the fast path, once per loaded model (the verdict is cached
on the model), and a model the fast path does not reproduce takes the full forward instead,
with one line saying so. The config only proposes which known transform to try.

Probe cost: two forwards of one 8-token row, no grad, eval mode (restored afterwards).
Under ZeRO-3 the probe is a forward like any other (every rank reaches its first log-prob
at the same step, and DeepSpeed's module hooks gather the weights); before the engine
exists, partitioned weights cannot be run, so `check_head` leaves the verdict to first use.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import UserError
from .decoder import decoder_states, has_decoder, inner_causal_lm, model_name, position_ids_from

PROBE_TOKENS = 8
_VERDICT = "_rlhf_head_path"  # attribute of the transformers model holding its HeadPath


@dataclass(frozen=True)
class LogitTransform:
    """z = softcap·tanh(scale·u / softcap) (or scale·u without a cap), u the head's output."""

    scale: float = 1.0
    softcap: float | None = None

    @classmethod
    def from_config(cls, config) -> LogitTransform:
        """The known transform this config asks for (a candidate: `head_path` checks it)."""
        config = config.get_text_config() if hasattr(config, "get_text_config") else config
        scale = float(getattr(config, "logit_scale", None) or 1.0)  # Cohere: multiplies
        scale /= float(getattr(config, "logits_scaling", None) or 1.0)  # Granite: divides
        softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2/3
        return cls(scale, float(softcap) if softcap else None)

    @property
    def identity(self) -> bool:
        return self.scale == 1.0 and self.softcap is None

    def __call__(self, head_out: torch.Tensor) -> torch.Tensor:
        """Logits, float32, from head outputs of any dtype (differentiable)."""
        return self.with_slope(head_out)[0]

    def with_slope(self, head_out: torch.Tensor):
        """(z float32, dz/du): the slope is the float `scale` without a cap, else a tensor
        like z (soft-cap: scale·(1 − tanh²(scale·u / c)), one value per vocabulary entry)."""
        z = head_out.float()
        if self.scale != 1.0:
            z = z * self.scale
        if self.softcap is None:
            return z, self.scale
        tanh = torch.tanh(z / self.softcap)
        return tanh * self.softcap, (1.0 - tanh.square()).mul_(self.scale)

    def __str__(self) -> str:
        parts = ([f"scale {self.scale:g}"] if self.scale != 1.0 else []) + (
            [f"soft-cap {self.softcap:g}"] if self.softcap is not None else [])
        return ", ".join(parts) or "none"


IDENTITY = LogitTransform()


@dataclass(frozen=True)
class HeadPath:
    """The probe's verdict: does decoder → head → `transform` give the model's own logits?"""

    exact: bool
    transform: LogitTransform = IDENTITY
    reason: str = ""


def _probe_rows(lm) -> tuple[torch.Tensor, torch.Tensor]:
    device = lm.get_input_embeddings().weight.device
    vocab = lm.get_input_embeddings().num_embeddings
    ids = (torch.arange(PROBE_TOKENS, device=device) * 37 + 5) % vocab
    return ids[None], torch.ones_like(ids)[None]


def _close(fast: torch.Tensor, full: torch.Tensor, dtype: torch.dtype) -> bool:
    """Equal log-softmax up to the rounding of the model's dtype (a missing transform is off
    by whole nats; rounding in bf16 of logits of size 30 is a few tenths)."""
    fast, full = fast.float().log_softmax(-1), full.float().log_softmax(-1)
    rel = 1e-4 if dtype == torch.float32 else 2e-2
    return bool(((fast - full).abs().max() <= rel * (1.0 + full.abs().max())).item())


@torch.no_grad()
def _probe(lm) -> HeadPath:
    head = lm.get_output_embeddings()
    if head is None or not has_decoder(lm):
        return HeadPath(False, reason="it has no separate output head and decoder body")
    ids, mask = _probe_rows(lm)
    full = lm(input_ids=ids, attention_mask=mask, position_ids=position_ids_from(mask),
              use_cache=False).logits[0]
    head_out = head(decoder_states(lm, ids, mask)[0])
    proposed = LogitTransform.from_config(lm.config)
    for transform in dict.fromkeys([proposed, IDENTITY]):
        if _close(transform(head_out), full, full.dtype):
            return HeadPath(True, transform)
    return HeadPath(False, reason=f"its logits are not its output head's (tried final transform: {proposed})")


def _in_eval_mode(lm, fn):
    """fn() with every submodule in eval mode (dropout off), each flag restored after."""
    flags = [(module, module.training) for module in lm.modules()]
    lm.eval()
    try:
        return fn()
    finally:
        for module, training in flags:
            module.training = training


def head_path(model) -> HeadPath:
    """The cached verdict for `model` (any wrapper), probing it on first use."""
    lm = inner_causal_lm(model)
    verdict = lm.__dict__.get(_VERDICT)
    if verdict is None:
        verdict = _in_eval_mode(lm, lambda: _probe(lm))
        lm.__dict__[_VERDICT] = verdict
        if not verdict.exact:
            say_once(f"{model_name(lm)}: {verdict.reason}; log-probs use the model's full forward "
                     "(no head-only speed-up)")
    return verdict


_SAID: set[str] = set()  # a policy and its reference copy are one message, not two


def say_once(text: str) -> None:
    import torch.distributed as dist

    if text not in _SAID and (not dist.is_initialized() or dist.get_rank() == 0):
        _SAID.add(text)
        from ..engine.progress import console

        console.print(text, highlight=False, soft_wrap=True)  # one line, however long


def partitioned(lm) -> bool:
    """Weights sharded by ZeRO-3 (cannot run outside DeepSpeed's engine)."""
    return any(hasattr(p, "ds_id") for p in lm.parameters())


def require_head(model, stage: str) -> HeadPath:
    """The verdict, or an error when `stage` can only read log-probs from the head (PPO: its
    states feed the value head too, so there is no full-forward fallback)."""
    verdict = head_path(model)
    if not verdict.exact:
        raise UserError(f"model {model_name(inner_causal_lm(model))} cannot be used for {stage}: "
                        f"{verdict.reason}, and {stage} reads log-probs from the head")
    return verdict


def check_head(model, stage: str) -> None:
    """Run the probe early (when the model is built), so that an unusable head is an error
    before anything is written; under ZeRO-3 it waits for the first forward (see above)."""
    if not partitioned(inner_causal_lm(model)):
        require_head(model, stage)
