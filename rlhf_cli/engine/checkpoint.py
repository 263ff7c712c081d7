"""Atomic, resumable checkpoints: `checkpoints/step-N/`.

Everything is written under `checkpoints/.tmp-step-N/`, flushed to disk and renamed when
complete, so a kill at any moment leaves only complete `step-*` directories; a leftover
`.tmp-*` is ignored and cleaned up by the next save. A failed write (disk full, no
permission) is a one-line error that names the checkpoint; the previous one stays.

torch and numpy are imported where state is saved or loaded: the CLI lists checkpoints
(`--resume` checks) before deciding to train, and a user error there should not wait for torch.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
from contextlib import contextmanager
from pathlib import Path

from ..errors import UserError

CHECKPOINTS = "checkpoints"
STATE_FILE = "trainer_state.json"
# OSErrors that mean "the disk cannot take this write", not a bug.
_STORAGE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES,
                   errno.EPERM, errno.EIO}


def write_failure(exc: BaseException, any_os_error: bool = False) -> str | None:
    """Why a write failed ("No space left on device"), or None when `exc` is no such failure.

    torch.save and safetensors wrap the OSError (torch as the exception's context,
    safetensors as text: "I/O error: File too large (os error 27)"). Without
    `any_os_error`, only errors that mean "the disk cannot take this write" count.
    """
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.strerror and (
                any_os_error or seen.errno in _STORAGE_ERRNOS):
            return seen.strerror
        seen = seen.__cause__ or seen.__context__
    match = re.search(r"I/O error: (.+?) \(os error (\d+)\)", str(exc))
    if match and (any_os_error or int(match.group(2)) in _STORAGE_ERRNOS):
        return match.group(1)
    return None


@contextmanager
def _writing_checkpoint(target: Path, run_dir: Path):
    try:
        yield
    except Exception as exc:  # OSError, torch's RuntimeError, safetensors' SafetensorError
        reason = write_failure(exc, any_os_error=True)
        if reason is None:
            raise
        previous = latest_checkpoint(run_dir)
        kept = (f"the previous checkpoint {previous} is kept" if previous is not None
                else "there is no earlier checkpoint")
        raise UserError(f"cannot write checkpoint to {target}: {reason}; {kept}") from exc


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


def _is_tensors(state: dict) -> bool:
    import torch

    return bool(state) and all(isinstance(v, torch.Tensor) for v in state.values())


def _split_parts(parts: dict) -> tuple[dict, dict]:
    """The parts' states: (small ones, by name, for trainer_state.json; tensor ones, by file)."""
    small, tensors = {}, {}
    for name, part in parts.items():
        state = part.state_dict()
        if _is_tensors(state):
            tensors[f"{name}.safetensors"] = state
        else:
            small[name] = state
    return small, tensors


def save_checkpoint(backend, run_dir: Path, step: int, trainer_state: dict, scheduler,
                    keep: int, parts: dict | None = None) -> Path:
    """Collective: every rank calls it. Returns the final directory.

    `parts`: the stage's extra stateful objects by name (`state_dict()`/`load_state_dict()`).
    A state of tensors only is written by the main process as `<name>.safetensors` (every
    process holds the same copy, e.g. an EMA); any other joins trainer_state.json under its
    name (a KL coefficient, counters). Per-process random streams are in rng-rank{N}.pt.
    """
    small, tensors = _split_parts(parts or {})
    trainer_state = {**trainer_state, **small}
    root = Path(run_dir) / CHECKPOINTS
    tmp, final = root / f".tmp-step-{step}", root / f"step-{step}"
    try:
        with _writing_checkpoint(final, run_dir):
            if backend.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
            backend.barrier()
            backend.save_state(tmp)
            _torch_save(rng_state(), tmp / f"rng-rank{backend.rank}.pt")
            if backend.is_main:
                _save_tensor_parts(tensors, tmp)
                _torch_save(scheduler.state_dict(), tmp / "scheduler.pt")
                # Written last: its presence marks the directory complete.
                (tmp / STATE_FILE).write_text(json.dumps({**trainer_state, "step": step}, indent=1))
            backend.barrier()
            if backend.is_main:
                _flush_to_disk(tmp)
                _remove(final)
                tmp.rename(final)
    except UserError:
        if backend.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if backend.is_main:
        _prune(root, keep)
    backend.barrier()
    return final


def _save_tensor_parts(tensors: dict, directory: Path) -> None:
    from safetensors.torch import save_file

    for name, state in tensors.items():
        save_file(state, str(directory / name))


def _load_parts(parts: dict, directory: Path, trainer_state: dict) -> None:
    """A part missing from the checkpoint keeps its fresh state."""
    from safetensors.torch import load_file

    for name, part in parts.items():
        file = directory / f"{name}.safetensors"
        if file.is_file():
            part.load_state_dict(load_file(str(file)))
        elif name in trainer_state:
            part.load_state_dict(trainer_state[name])


def _torch_save(obj, path: Path) -> None:
    import torch

    # Through a Python file: a full disk then raises OSError ("No space left on device")
    # rather than torch's bare "unexpected pos".
    with open(path, "wb") as handle:
        torch.save(obj, handle)


def _flush_to_disk(directory: Path) -> None:
    """fsync every file, so that after a power cut the renamed directory is not empty."""
    for path in sorted(directory.rglob("*")):
        if path.is_file():
            with open(path, "rb") as handle:
                os.fsync(handle.fileno())


def _prune(root: Path, keep: int) -> None:
    for stale in root.glob(".tmp-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    complete = list_checkpoints(root.parent)
    for old in complete[:-keep]:
        _remove(old)


def _remove(checkpoint: Path) -> None:
    """Unmark first: a kill in the middle of rmtree must not leave a half-deleted
    directory that still looks complete."""
    (checkpoint / STATE_FILE).unlink(missing_ok=True)
    shutil.rmtree(checkpoint, ignore_errors=True)


def load_checkpoint(backend, directory: Path, scheduler, parts: dict | None = None) -> dict:
    """Restore model, optimizer, scheduler, this rank's RNG and the stage's `parts` (as
    `save_checkpoint` wrote them); returns the trainer state."""
    import torch

    try:
        backend.load_state(directory)
        scheduler.load_state_dict(torch.load(directory / "scheduler.pt", weights_only=True))
        rng_file = directory / f"rng-rank{backend.rank}.pt"
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        state = json.loads((directory / STATE_FILE).read_text())
        _load_parts(parts or {}, directory, state)
        return state
    except UserError:
        raise
    except Exception as exc:  # torch, safetensors and DeepSpeed raise many unrelated types
        raise UserError(f"cannot load checkpoint {directory}: {_what_failed(exc)}; it does not match "
                        "this recipe or is damaged (move it away to resume from an older one)"
                        ) from exc


def _what_failed(exc: Exception, limit: int = 300) -> str:
    """The first line of the error, and the line after it where the first only announces a list
    (torch's "Error(s) in loading state_dict for X:" says nothing until its first key)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()] or [type(exc).__name__]
    said = f"{lines[0]} {lines[1]}" if lines[0].endswith(":") and len(lines) > 1 else lines[0]
    return said if len(said) <= limit else said[: limit - 3] + "..."
