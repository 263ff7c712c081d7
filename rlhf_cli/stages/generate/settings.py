"""What `rlhf generate` is asked to do: its command-line settings, checked before anything loads.

They are written beside the output (`OUT.parts/settings.json`) so that the launched ranks read
the same ones and `--resume` can refuse a continuation that would mix different samples.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from ...errors import UserError

# May differ between a run and its --resume: they do not change which samples a prompt gets.
FREE_ON_RESUME = ("batch_size",)


@dataclass
class GenerateSettings:
    model: str
    data: str
    out: str
    n: int = 4
    reward_model: str | None = None
    reward_fn: str | None = None
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 64
    template: str | None = None  # None: the run's own data.template (plain for a bare model)
    max_prompt_length: int | None = None
    batch_size: int = 8  # prompts per generate() call (each sampled n times)
    seed: int = 0

    def check(self) -> None:
        """The first bad setting as a UserError naming its option."""
        for option, problem in self._problems():
            raise UserError(problem, where=option)

    def _problems(self):
        if not Path(self.model).expanduser().is_dir():
            yield "--model", f"not found: {self.model} (a run directory, or a model or adapter directory)"
        if not self.data.startswith("builtin:") and not Path(self.data).expanduser().exists():
            yield "--data", f"not found: {self.data}"
        if self.n < 1:
            yield "--n", f"must be at least 1 (responses per prompt), got {self.n}"
        if not (self.temperature > 0 and math.isfinite(self.temperature)):
            yield "--temperature", f"must be above 0, got {self.temperature}"
        if not 0 < self.top_p <= 1:
            yield "--top-p", f"must be in (0, 1], got {self.top_p}"
        if self.top_k < 0:
            yield "--top-k", f"must be 0 (off) or more, got {self.top_k}"
        if self.max_new_tokens < 1:
            yield "--max-new-tokens", f"must be at least 1, got {self.max_new_tokens}"
        if self.batch_size < 1:
            yield "--batch-size", f"must be at least 1, got {self.batch_size}"
        if self.max_prompt_length is not None and self.max_prompt_length < 1:
            yield "--max-prompt-length", f"must be at least 1, got {self.max_prompt_length}"
        if self.reward_model and self.reward_fn:
            yield "--reward-model", "give one judge, --reward-model or --reward-fn, not both"
        if not self.out:
            yield "--out", "missing: name the JSON Lines file to write"

    def write(self, path: Path) -> None:
        path.write_text(json.dumps(asdict(self), indent=1))

    @classmethod
    def read(cls, path: Path) -> GenerateSettings:
        return cls(**json.loads(path.read_text()))

    def changed_from(self, earlier: GenerateSettings) -> list[str]:
        """The settings that differ from `earlier` and must not on --resume."""
        return [f.name for f in fields(self)
                if f.name not in FREE_ON_RESUME and getattr(self, f.name) != getattr(earlier, f.name)]
