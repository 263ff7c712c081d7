"""metrics.jsonl (the contract), plus TensorBoard and wandb when asked for."""

from __future__ import annotations

import json
import math
from collections import defaultdict
from pathlib import Path

from ..errors import UserError


class MetricWindow:
    """Weighted running means between two log lines."""

    def __init__(self):
        self.sums: dict[str, float] = defaultdict(float)
        self.weights: dict[str, float] = defaultdict(float)

    def add(self, values: dict[str, float], weight: float = 1.0) -> None:
        for key, value in values.items():
            self.sums[key] += float(value) * weight
            self.weights[key] += weight

    def means(self) -> dict[str, float]:
        return {k: self.sums[k] / self.weights[k] for k in self.sums if self.weights[k]}

    def reset(self) -> None:
        self.sums.clear()
        self.weights.clear()

    def state_dict(self) -> dict:
        return {"sums": dict(self.sums), "weights": dict(self.weights)}

    def load_state_dict(self, state: dict) -> None:
        self.reset()
        self.sums.update(state.get("sums", {}))
        self.weights.update(state.get("weights", {}))


def _clean(value):
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)  # JSON has no NaN; keep the row valid
    return value


def _parse(line: str) -> dict | None:
    """A row, or None for a blank line or the partial last line of a killed run."""
    try:
        return json.loads(line) if line.strip() else None
    except json.JSONDecodeError:
        return None


class MetricsLogger:
    """Appends one JSON object per logged step; only the main process writes."""

    def __init__(self, run_dir: Path, enabled: bool, report_to: list[str]):
        self.path = Path(run_dir) / "metrics.jsonl"
        self.enabled = enabled
        self.tensorboard = self.wandb = None
        if not enabled:
            return
        if "tensorboard" in report_to:
            from torch.utils.tensorboard import SummaryWriter

            self.tensorboard = SummaryWriter(str(Path(run_dir) / "tensorboard"))
        if "wandb" in report_to:
            try:
                import wandb
            except ImportError:
                wandb = None
            if wandb is not None:
                self.wandb = wandb.init(project="rlhf", dir=str(run_dir))

    def truncate_after(self, step: int) -> None:
        """On resume, drop rows logged after the checkpoint so the file has no duplicates."""
        if not self.enabled or not self.path.is_file():
            return
        kept = [line for line in self.path.read_text().splitlines()
                if (row := _parse(line)) is not None and row.get("step", 0) <= step]
        self.path.write_text("".join(line + "\n" for line in kept))

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        row = {k: _clean(v) for k, v in row.items()}
        try:
            with self.path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
        except OSError as exc:
            raise UserError(f"cannot write metrics to {self.path}: {exc.strerror}") from exc
        step = row.get("step", 0)
        prefix = "eval/" if row.get("split") == "eval" else "train/"
        numbers = {k: v for k, v in row.items()
                   if isinstance(v, (int, float)) and k not in ("step", "split")}
        if self.tensorboard is not None:
            for key, value in numbers.items():
                self.tensorboard.add_scalar(prefix + key, value, step)
        if self.wandb is not None:
            self.wandb.log({prefix + k: v for k, v in numbers.items()}, step=step)

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
        if self.wandb is not None:
            self.wandb.finish()


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
