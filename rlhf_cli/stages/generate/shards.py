"""Where `rlhf generate` keeps its rows until every prompt has them, and how they become OUT.

Each rank appends whole lines to its own `OUT.parts/rank<r>.jsonl` (one `os.write` of a
batch's lines on an O_APPEND file), each row naming its prompt's index. A killed run leaves
at worst one torn last line per file: `--resume` cuts it off and sets the files aside as
`earlier<k>.jsonl`; the ranks read which prompts are done from those and share out only the
others (any number of ranks, any earlier number). When
every prompt has exactly one row, they are written to OUT in prompt order (atomically) and
the parts directory goes.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from ...engine.run_dir import write_atomic
from ...errors import UserError
from .settings import GenerateSettings

SETTINGS = "settings.json"
TOTAL = "total.json"  # {"prompts": N}, written by the ranks once the prompts are read


def parts_dir(out: str | Path) -> Path:
    out = Path(out)
    return out.with_name(out.name + ".parts")


def rank_file(parts: Path, rank: int) -> Path:
    return parts / f"rank{rank}.jsonl"


def start(settings: GenerateSettings, resume: bool) -> bool:
    """Prepare OUT.parts/ for a fresh run or a --resume; False when OUT is already complete."""
    out, parts = Path(settings.out), parts_dir(settings.out)
    if not parts.is_dir():
        if out.exists():
            if resume:
                return False
            raise UserError(f"{out} exists: remove it, or write to another --out", where="--out")
        if not out.parent.is_dir():
            raise UserError(f"no directory {out.parent} to write {out.name} in", where="--out")
        parts.mkdir()
        settings.write(parts / SETTINGS)
        return True
    if not resume:
        raise UserError(f"{parts} holds an interrupted run: continue it with --resume, or remove it",
                        where="--out")
    changed = settings.changed_from(GenerateSettings.read(parts / SETTINGS))
    if changed:
        raise UserError(f"--resume continues the run in {parts}, but this command changes "
                        f"{', '.join(changed)}: drop the changes, or write to another --out")
    keep_earlier_rows(parts)
    return True


def discard(settings: GenerateSettings) -> None:
    """A fresh run that failed on bad input leaves nothing behind."""
    shutil.rmtree(parts_dir(settings.out), ignore_errors=True)


def cut_torn_line(file: Path) -> None:
    """Drop a last line without its newline (the process died inside that write)."""
    data = file.read_bytes()
    if data and not data.endswith(b"\n"):
        with open(file, "r+b") as handle:
            handle.truncate(data.rfind(b"\n") + 1)


def keep_earlier_rows(parts: Path) -> None:
    """Set the interrupted run's rows aside (`earlier<k>.jsonl`, never written again), torn
    last lines cut off: the ranks read which prompts are done from these alone, so that a
    rank already appending new rows cannot change what another rank thinks is left."""
    count = len(list(parts.glob("earlier*.jsonl")))
    for file in sorted(parts.glob("rank*.jsonl")):
        cut_torn_line(file)
        file.rename(parts / f"earlier{count}.jsonl")
        count += 1


def written_rows(parts: Path, pattern: str = "*.jsonl") -> list[dict]:
    rows = []
    for file in sorted(parts.glob(pattern)):
        rows += [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line]
    return rows


def done_indices(parts: Path, prompts: list[str]) -> set[int]:
    """Prompts that already have their row; an error if the rows are not of these prompts."""
    done = set()
    for row in written_rows(parts, "earlier*.jsonl"):
        index = row["index"]
        if index >= len(prompts) or prompts[index] != row["prompt"]:
            raise UserError(f"{parts} holds rows of other prompts than --data gives now (row {index}): "
                            "continue with the same data and template, or write to another --out")
        done.add(index)
    return done


def write_total(parts: Path, count: int) -> None:
    write_atomic(parts / TOTAL, json.dumps({"prompts": count}))


class RowWriter:
    """Appends whole lines to one rank's file, a batch per write, flushed to the OS at once."""

    def __init__(self, file: Path):
        self.fd = os.open(file, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def append(self, rows: list[dict]) -> None:
        data = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows).encode("utf-8")
        view = memoryview(data)
        while view:  # a regular file takes it in one write; loop for the odd short write
            view = view[os.write(self.fd, view):]

    def close(self) -> None:
        os.close(self.fd)


def merge(settings: GenerateSettings) -> int:
    """Every prompt's row, once, in prompt order, into OUT; the number of rows."""
    parts = parts_dir(settings.out)
    total = json.loads((parts / TOTAL).read_text())["prompts"]
    by_index: dict[int, dict] = {}
    for row in written_rows(parts):
        if row["index"] in by_index:
            raise RuntimeError(f"prompt {row['index']} has two rows in {parts}")  # a bug, not bad input
        by_index[row.pop("index")] = row
    missing = sorted(set(range(total)) - set(by_index))
    if missing:
        raise RuntimeError(f"{len(missing)} prompts have no row in {parts} (first: {missing[:3]})")
    write_atomic(Path(settings.out), "".join(json.dumps(by_index[i], ensure_ascii=False) + "\n"
                                             for i in range(total)))
    shutil.rmtree(parts)
    return total
