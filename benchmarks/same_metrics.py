"""Refactors change nothing: the metrics of four tiny recipes, fixed seed, before and after.

Runs `tiny-sft`, `tiny-dpo`, `tiny-rm` and `tiny-ppo-1base-1lora` for 30 steps (iterations for
PPO) on the built-in task, one process, logging every step, and keeps every metrics row
without its timing and memory figures. `--record FILE` writes them; `--check FILE` runs again
and compares with a recording: every row and key must be equal (floats to `--rtol`, 0 by
default: the same code computes the same bits on one machine). Prints the differences, exit 1
if there is any. About 3-4 minutes on 2 idle cores.

    .venv/bin/python benchmarks/same_metrics.py --record /tmp/before.json   # on the old code
    .venv/bin/python benchmarks/same_metrics.py --check /tmp/before.json    # on the new code
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = ("tiny-sft", "tiny-dpo", "tiny-rm", "tiny-ppo-1base-1lora")
STEPS = 30
# Figures of the machine, not of the maths.
VOLATILE = ("time", "per_sec", "rss_mb", "cuda_peak_mb", "seconds")


def run_recipe(name: str, work: Path) -> list[dict]:
    stage = name.split("-")[1]
    out = work / name
    argv = [sys.executable, "-m", "rlhf_cli.cli", stage, "--recipe", str(REPO / "recipes" / f"{name}.yaml"),
            "-o", str(out), "--set", f"train.max_steps={STEPS}", "--set", "train.log_every=1",
            "--set", "train.save_every=null", "--set", "train.eval_every=15"]
    if stage != "rm":
        argv += ["--set", "train.eval_num_prompts=16"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    proc = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.exit(f"{name} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return [{k: v for k, v in row.items() if not any(word in k for word in VOLATILE)} for row in rows]


def run_all() -> dict[str, list[dict]]:
    with tempfile.TemporaryDirectory() as tmp:
        return {name: run_recipe(name, Path(tmp)) for name in RECIPES}


def _same(a, b, rtol: float) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b or abs(a - b) <= rtol * max(abs(a), abs(b))
    return a == b


def differences(before: dict, after: dict, rtol: float) -> list[str]:
    found = []
    for name in RECIPES:
        old, new = before.get(name, []), after.get(name, [])
        if len(old) != len(new):
            found.append(f"{name}: {len(old)} rows before, {len(new)} after")
        for i, (a, b) in enumerate(zip(old, new, strict=False)):
            for key in sorted(set(a) | set(b)):
                if not _same(a.get(key), b.get(key), rtol):
                    where = f"{name} row {i} (step {a.get('step')})"
                    found.append(f"{where} {key}: {a.get(key)!r} -> {b.get(key)!r}")
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    action = parser.add_mutually_exclusive_group(required=True)
    action.add_argument("--record", type=Path, help="write the metrics to this JSON file")
    action.add_argument("--check", type=Path, help="compare with a recording made by --record")
    parser.add_argument("--rtol", type=float, default=0.0, help="relative tolerance for floats")
    args = parser.parse_args()
    metrics = run_all()
    if args.record:
        args.record.write_text(json.dumps(metrics, indent=1))
        print(f"recorded {sum(map(len, metrics.values()))} rows of {len(metrics)} runs in {args.record}")
        return 0
    found = differences(json.loads(args.check.read_text()), metrics, args.rtol)
    rows = sum(map(len, metrics.values()))
    print("\n".join(found[:50]) if found else f"same metrics: {rows} rows of {len(metrics)} runs")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
