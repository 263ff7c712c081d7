"""What every `rlhf` command shares: its option types and how a user error ends it.

Commands with many options of their own live in modules beside cli.py (cli_*.py) and are
registered on the app there; importing any of them must not import torch.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated

import typer

from .errors import EXIT_USER_ERROR, UserError

RecipeOpt = Annotated[Path, typer.Option("--recipe", "-r", help="YAML recipe file.")]
SetOpt = Annotated[
    list[str] | None,
    typer.Option("--set", "-s", help="Override a recipe key: `--set train.lr=1e-4` "
                 "(repeatable; the value is YAML, `null` clears an optional key)."),
]
OutOpt = Annotated[str | None, typer.Option("--output-dir", "-o", help="Run directory.")]
DryOpt = Annotated[bool, typer.Option("--dry-run", help="Print the resolved recipe, the launch "
                                      "command and the first example; train nothing.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Continue from the newest complete "
                                         "checkpoint in the output directory.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace an existing run in the "
                                            "output directory.")]
DebugOpt = Annotated[bool, typer.Option("--debug", help="Show tracebacks for user errors.")]


def debug_wanted(flag: bool) -> bool:
    return flag or os.environ.get("RLHF_DEBUG", "") not in ("", "0")


def fail(exc: UserError, debug: bool) -> None:
    if debug:
        raise exc
    typer.echo(f"error: {exc}", err=True)
    raise typer.Exit(EXIT_USER_ERROR)


def run_ignoring_ctrl_c(run, argv: list[str]) -> int:
    """Ctrl-C reaches the launcher too, which forwards it to the workers (they save a
    checkpoint and stop); this process only waits. Left to Python, its KeyboardInterrupt
    would kill the launcher at once. A Python handler, not SIG_IGN: the launcher must
    start with Ctrl-C enabled (an ignored signal stays ignored across exec)."""
    import signal

    previous = signal.signal(signal.SIGINT, lambda signum, frame: None)
    try:
        return run(argv)
    finally:
        signal.signal(signal.SIGINT, previous)
