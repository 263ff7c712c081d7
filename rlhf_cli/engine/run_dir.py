"""The run's output directory: refuse to clobber, write recipe.yaml and run.json."""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from importlib import metadata
from pathlib import Path

from ..errors import UserError
from .checkpoint import latest_checkpoint

FINAL = "final"
RECIPE = "recipe.yaml"
RUN_INFO = "run.json"
_MARKERS = (RECIPE, FINAL, "checkpoints", "metrics.jsonl")


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def prepare_run_dir(output_dir: str, *, resume: bool, overwrite: bool) -> Path:
    """Check the directory can be used; never touches existing work unless told to."""
    run_dir = Path(output_dir)
    if run_dir.exists() and not run_dir.is_dir():
        raise UserError(f"output directory is a file: {run_dir}")
    used = run_dir.is_dir() and any((run_dir / m).exists() for m in _MARKERS)
    if resume:
        if not used or latest_checkpoint(run_dir) is None:
            if (run_dir / FINAL).is_dir():
                raise UserError(f"{run_dir} already finished (it has final/); nothing to resume")
            raise UserError(f"no complete checkpoint to resume from in {run_dir}")
    elif used:
        if not overwrite:
            raise UserError(
                f"output directory {run_dir} already holds a run: pass --resume to continue "
                "it, --overwrite to replace it, or --output-dir for a new one"
            )
        shutil.rmtree(run_dir)
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create output directory {run_dir}: {exc.strerror}") from None
    return run_dir


def discard_untrained_run(run_dir: Path, *, remove_dir: bool) -> None:
    """Remove what a run wrote before it trained anything (recipe.yaml, run.json).

    Only when it has no checkpoint, no metrics and no final/: those are work to protect.
    The directory itself goes only when this run created it and it is now empty.
    """
    run_dir = Path(run_dir)
    if any((run_dir / m).exists() for m in _MARKERS if m != RECIPE):
        return
    for name in (RECIPE, RUN_INFO):
        (run_dir / name).unlink(missing_ok=True)
    if remove_dir and run_dir.is_dir() and not any(run_dir.iterdir()):
        run_dir.rmdir()


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def write_run_info(run_dir: Path, world_size: int, **extra) -> dict:
    info = {
        "command": os.environ.get("RLHF_COMMAND", " ".join(sys.argv)),
        "world_size": world_size,
        "start_time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "end_time": None,
        "python": sys.version.split()[0],
        "versions": {n: _version(n) for n in
                     ("rlhf-cli", "torch", "transformers", "peft", "accelerate", "deepspeed")},
        **extra,
    }
    path = Path(run_dir) / RUN_INFO
    previous = json.loads(path.read_text()) if path.is_file() else None
    if previous is not None:  # a resumed run keeps the history of its starts
        info["resumed_from"] = previous
    write_atomic(path, json.dumps(info, indent=1))
    return info


def finish_run_info(run_dir: Path, **extra) -> None:
    path = Path(run_dir) / RUN_INFO
    info = json.loads(path.read_text())
    info["end_time"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    info.update(extra)
    write_atomic(path, json.dumps(info, indent=1))
