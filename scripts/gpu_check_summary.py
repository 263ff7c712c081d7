"""The table at the end of scripts/gpu_check.sh: peak CUDA memory and time per iteration of
each PPO run, read from its metrics.jsonl (`cuda_peak_mb`, `rss_mb`, `time_*`).

    python scripts/gpu_check_summary.py OUT_DIR
    python scripts/gpu_check_summary.py --can-quantize   # exit 0, or 1 with the reason on stdout
"""

from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

PHASES = ("time_generate", "time_score", "time_train")


def quantization_unavailable() -> str | None:
    """Why a `model.quantization: 4bit` run cannot be tried here, or None when it can."""
    from dataclasses import fields

    from rlhf_cli.schema import ModelSection

    if "quantization" not in {f.name for f in fields(ModelSection)}:
        return "this version of rlhf has no model.quantization key"
    if importlib.util.find_spec("bitsandbytes") is None:
        return "bitsandbytes is not installed (pip install 'bitsandbytes>=0.47')"
    return None


def train_rows(run: Path) -> list[dict]:
    lines = (run / "metrics.jsonl").read_text().splitlines()
    return [row for row in map(json.loads, filter(str.strip, lines)) if row.get("split") != "eval"]


def ppo_figures(run: Path) -> dict:
    """Peak memory over the run; seconds per iteration, the first (warm-up) left out when
    there are others."""
    rows = train_rows(run)
    times = [sum(row[k] for k in PHASES) for row in rows]
    steady = times[1:] or times
    peak = [row["cuda_peak_mb"] for row in rows if "cuda_peak_mb" in row]
    return {"iterations": len(rows), "sec_per_iter": statistics.mean(steady),
            "cuda_peak_mb": max(peak) if peak else None,
            "rss_mb": max((row["rss_mb"] for row in rows if "rss_mb" in row), default=None)}


def table(out: Path) -> list[str]:
    lines = [f"{'ppo run':<28}{'iters':>6}{'s/iter':>9}{'peak CUDA MiB':>15}{'peak RSS MiB':>14}"]
    for run in sorted(out.glob("ppo-*")):
        if not (run / "metrics.jsonl").is_file():
            continue  # a merged model directory, or a run that did not start
        f = ppo_figures(run)
        cuda = f"{f['cuda_peak_mb']:.0f}" if f["cuda_peak_mb"] is not None else "n/a"
        rss = f"{f['rss_mb']:.0f}" if f["rss_mb"] is not None else "n/a"
        lines.append(f"{run.name:<28}{f['iterations']:>6}{f['sec_per_iter']:>9.2f}{cuda:>15}{rss:>14}")
    return lines


def main(argv: list[str]) -> int:
    if argv == ["--can-quantize"]:
        reason = quantization_unavailable()
        if reason:
            print(reason)
        return 1 if reason else 0
    if len(argv) != 1:
        print(__doc__, file=sys.stderr)
        return 2
    print("\n".join(table(Path(argv[0]))))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
