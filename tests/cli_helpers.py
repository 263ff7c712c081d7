"""Running the real CLI in tests: a fresh interpreter per command, so exit codes are real."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def rlhf(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None) -> subprocess.CompletedProcess:
    """`rlhf ARGS` offline, on one thread (the two cores are shared), without RLHF_DEBUG."""
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO), **(env or {})}
    full_env.pop("RLHF_DEBUG", None)
    return subprocess.run([sys.executable, "-m", "rlhf_cli.cli", *args], cwd=cwd, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train_rows(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r.get("split") != "eval"]


def eval_rows(run: Path) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl") if r.get("split") == "eval"]
