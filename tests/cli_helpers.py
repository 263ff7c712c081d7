"""Running the real CLI in tests: a fresh interpreter per command, so exit codes are real.

Also what the end-to-end and fault tests read back from a run: metrics rows, weights, checkpoints
and the one `error:` line of a failed command.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def cli_env(env: dict | None = None, *, pythonpath: bool = True, debug: bool = False) -> dict:
    """The environment of an `rlhf` subprocess: offline, on one thread, without RLHF_DEBUG.

    One thread: with two busy cores, OpenMP's spinning threads make a tiny model's step ~40x
    slower than a single thread does. `pythonpath` puts the repository first on PYTHONPATH
    (without it PYTHONPATH stays as inherited); `env` overrides the rest; `debug` sets RLHF_DEBUG=1.
    """
    full_env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1",
                "TOKENIZERS_PARALLELISM": "false"}
    if pythonpath:
        full_env["PYTHONPATH"] = str(REPO)
    full_env.update(env or {})
    full_env.pop("RLHF_DEBUG", None)
    if debug:
        full_env["RLHF_DEBUG"] = "1"
    return full_env


def cli_argv(*args: str) -> list[str]:
    """The command line of `rlhf ARGS` (for subprocess.Popen, with cli_env())."""
    return [sys.executable, "-m", "rlhf_cli.cli", *args]


def rlhf(*args: str, cwd: Path, timeout: float = 300, env: dict | None = None, pythonpath: bool = True,
         debug: bool = False, **kwargs) -> subprocess.CompletedProcess:
    """`rlhf ARGS` in a fresh interpreter, in cli_env(); extra keywords go to subprocess.run."""
    return subprocess.run(cli_argv(*args), cwd=cwd, env=cli_env(env, pythonpath=pythonpath, debug=debug),
                          capture_output=True, text=True, timeout=timeout, **kwargs)


def run_in(work: Path, *args: str) -> tuple[Path, subprocess.CompletedProcess]:
    """`rlhf ARGS -o run` in `work`, which must succeed: (work / "run", the finished process)."""
    proc = rlhf(*args, "-o", "run", cwd=work)
    assert proc.returncode == 0, proc.stderr
    return work / "run", proc


def read_jsonl(path: Path, strict: bool = False) -> list[dict]:
    """One JSON value a line; blank lines are skipped unless `strict` (then they fail to parse)."""
    return [json.loads(line) for line in path.read_text().splitlines() if strict or line.strip()]


def train_rows(run: Path, strict: bool = False) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl", strict) if r.get("split") != "eval"]


def eval_rows(run: Path, strict: bool = False) -> list[dict]:
    return [r for r in read_jsonl(run / "metrics.jsonl", strict) if r.get("split") == "eval"]


def error_line(stderr: str) -> str:
    """The one `error:` line of a failed command, which has no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def same_tensors(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def complete_checkpoints(run: Path) -> list[Path]:
    from rlhf_cli.engine.checkpoint import list_checkpoints

    return [p for p in list_checkpoints(run) if (p / "trainer_state.json").is_file()]
