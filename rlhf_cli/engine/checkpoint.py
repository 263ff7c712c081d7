"""Atomic, resumable checkpoints: `checkpoints/step-N/`.

Everything is written under `checkpoints/.tmp-step-N/` and renamed when complete, so a
kill at any moment leaves only complete `step-*` directories; a leftover `.tmp-*` is
ignored and cleaned up by the next save.

torch and numpy are imported where state is saved or loaded: the CLI lists checkpoints
(`--resume` checks) before deciding to train, and a user error there should not wait for torch.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"


def _step_of(path: Path) -> int | None:
    name = path.name
    if not name.startswith("step-") or not path.is_dir():
        return None
    try:
        return int(name[len("step-"):])
    except ValueError:
        return None


def list_checkpoints(run_dir: Path) -> list[Path]:
    root = Path(run_dir) / CHECKPOINTS
    if not root.is_dir():
        return []
    found = [(s, p) for p in root.iterdir() if (s := _step_of(p)) is not None]
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: Path) -> Path | None:
    complete = [p for p in list_checkpoints(run_dir) if (p / STATE_FILE).is_file()]
    return complete[-1] if complete else None


def rng_state() -> dict:
    import torch

    state = {
        "python": random.getstate(),
        "numpy": _numpy_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _numpy_state() -> list:
    import numpy as np

    kind, keys, pos, has_gauss, cached = np.random.get_state()
    return [kind, keys.tolist(), pos, has_gauss, cached]


def set_rng_state(state: dict) -> None:
    import numpy as np
    import torch

    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, np.array(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_checkpoint(backend, run_dir: Path, step: int, trainer_state: dict, scheduler,
                    keep: int) -> Path:
    """Collective: every rank calls it. Returns the final directory."""
    import torch

    root = Path(run_dir) / CHECKPOINTS
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    if backend.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    backend.barrier()
    backend.save_state(tmp)
    torch.save(rng_state(), tmp / f"rng-rank{backend.rank}.pt")
    if backend.is_main:
        torch.save(scheduler.state_dict(), tmp / "scheduler.pt")
        # Written last: its presence marks the directory complete.
        (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=1))
    backend.barrier()
    if backend.is_main:
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        _prune(root, keep)
    backend.barrier()
    return final


def _prune(root: Path, keep: int) -> None:
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    complete = list_checkpoints(root.parent)
    for old in complete[:-keep]:
        shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(backend, directory: Path, scheduler) -> dict:
    """Restore model, optimizer, scheduler and this rank's RNG; returns the trainer state."""
    import torch

    backend.load_state(directory)
    scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
    rng_file = directory / f"rng-rank{backend.rank}.pt"
    if rng_file.is_file():
        set_rng_state(torch.load(rng_file, weights_only=True))
    return json.loads((directory / STATE_FILE).read_text())
