"""A rich progress bar with live metrics, shown by the main process only."""

from __future__ import annotations

import sys

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

console = Console(stderr=True)


def say(backend, text: str) -> None:
    """One line on the console, from the main process only."""
    if backend.is_main:
        console.print(text, highlight=False)


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


class TrainingProgress:
    def __init__(self, total: int, start: int, enabled: bool, title: str):
        self.enabled = enabled
        self.interactive = enabled and sys.stderr.isatty()
        self.progress = None
        if self.interactive:
            self.progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                TimeElapsedColumn(), TimeRemainingColumn(), TextColumn("{task.fields[metrics]}"),
                console=console, transient=False,
            )
            self.task = self.progress.add_task(title, total=total, completed=start, metrics="")
            self.progress.start()

    def update(self, step: int, metrics: dict | None = None) -> None:
        if self.progress is not None:
            shown = "" if not metrics else "  ".join(
                f"{k}={_fmt(v)}" for k, v in metrics.items())
            if metrics is None:
                self.progress.update(self.task, completed=step)
            else:
                self.progress.update(self.task, completed=step, metrics=shown)

    def log_line(self, text: str) -> None:
        """A line that stays in logs (CI, files) where the live bar is not shown."""
        if not self.enabled:
            return
        if self.progress is not None:
            self.progress.console.print(text)
        else:
            console.print(text, highlight=False)

    def close(self) -> None:
        if self.progress is not None:
            self.progress.stop()
