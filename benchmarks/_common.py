"""What the benchmarks share: data files, running a side in a fresh measured process, the timed
window read from its "step N/TOTAL" lines, best-of-N summaries (the report: _report.py).

Nothing here imports torch: the parent process of a benchmark only starts and watches children.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from _report import loadavg

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-harmless-dev.jsonl.gz"  # ../shared beside the repo
OURS_BEGIN = "model: "  # our CLI's line once the model and its adapter are built, before training
TRL_BEGIN = "TRAIN_BEGIN"  # printed by the trl runners in on_train_begin
SPECIAL_TEXTS = ("<s>", "</s>", "<pad>", "<unk>")  # the built-in tokenizer reads these as specials


# ---------------------------------------------------------------------------------------- arguments


def add_common_args(p: argparse.ArgumentParser, *, data: bool = True) -> None:
    """Options every benchmark takes (threads, repeats, output) and, with `data`, the HH file."""
    if data:
        p.add_argument("--data", type=Path, default=Path(os.environ.get("RLHF_BENCH_DATA", DEFAULT_DATA)),
                       help="HH-RLHF jsonl(.gz) with 'chosen'/'rejected' fields (default: %(default)s)")
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads in every child (default: the CPUs this process may use, %(default)s)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each side this many times, alternating; the fastest run of each counts, "
                   "the largest peak RSS (default: 1)")
    p.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    p.add_argument("--keep", type=Path, help="keep data, recipes, run dirs and logs in this directory")
    p.add_argument("--dry-run", action="store_true",
                   help="prepare the data and print the plan and the commands; train nothing")


def add_size_args(p: argparse.ArgumentParser, *, lr: float, batch_help: str | None = None) -> None:
    """--batch-size, --max-length and --lr, as the SFT and DPO benches and their trl runners take them."""
    p.add_argument("--batch-size", type=int, default=8, help=batch_help)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=lr)


def add_lora_args(p: argparse.ArgumentParser, *, dropout: float | None = None) -> None:
    """--lora-r, --lora-alpha and, with a default `dropout`, --lora-dropout."""
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    if dropout is not None:
        p.add_argument("--lora-dropout", type=float, default=dropout)


# --------------------------------------------------------------------------------------------- data


def read_hh(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def has_special_text(*texts: str) -> bool:
    return any(s in t for t in texts for s in SPECIAL_TEXTS)


# ------------------------------------------------------------------------------------------ running


@dataclass
class Measured:
    wall_s: float
    cpu_s: float
    peak_rss: int  # bytes, ru_maxrss of the process
    sampled_peak_rss: int  # bytes, the largest of RSS samples every 20 ms (a cross-check)
    marks: dict  # marker -> (seconds since start, CPU seconds, RSS bytes) when its line was read
    output: str
    returncode: int
    rss_timeline: list = field(default_factory=list)  # (seconds since start, RSS bytes) every ~0.2 s

    def peak_between(self, start: float, end: float) -> int:
        """The largest RSS sampled between two times (seconds since start), in bytes."""
        return max((rss for t, rss in self.rss_timeline if start <= t <= end), default=0)


def run_measured(argv: list[str], env: dict, markers: list[str], log_file: Path) -> Measured:
    """Run a command in a fresh process: its own peak RSS (wait4), wall and CPU time, and its clock,
    CPU time and RSS when it prints the first line starting with each of `markers`."""
    import psutil

    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True, errors="replace")
    handle = psutil.Process(proc.pid)
    lines: list[str] = []
    state = {"sampled": 0, "done": False}
    marks: dict = {}

    def rss() -> int:
        try:
            return handle.memory_info().rss
        except psutil.Error:
            return 0

    def read() -> None:
        for line in proc.stdout:
            lines.append(line)
            for marker in markers:
                if marker not in marks and line.startswith(marker):
                    try:
                        cpu = handle.cpu_times()
                        marks[marker] = (time.perf_counter() - start, cpu.user + cpu.system, rss())
                    except psutil.Error:
                        pass

    timeline: list[tuple[float, int]] = []

    def sample() -> None:
        window = 0
        while not state["done"]:
            now = rss()
            state["sampled"] = max(state["sampled"], now)
            window = max(window, now)
            elapsed = time.perf_counter() - start
            if not timeline or elapsed - timeline[-1][0] >= 0.2:
                timeline.append((elapsed, window))  # the largest sample since the previous entry
                window = 0
            time.sleep(0.02)

    threads = [threading.Thread(target=read, daemon=True), threading.Thread(target=sample, daemon=True)]
    for t in threads:
        t.start()
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - start
    state["done"] = True
    proc.returncode = os.waitstatus_to_exitcode(status)
    for t in threads:
        t.join(timeout=5)
    output = "".join(lines)
    log_file.write_text(output, encoding="utf-8")
    return Measured(wall_s=wall, cpu_s=usage.ru_utime + usage.ru_stime, peak_rss=usage.ru_maxrss * 1024,
                    sampled_peak_rss=state["sampled"], marks=marks,
                    output=output, returncode=proc.returncode, rss_timeline=timeline)


def child_env(threads: int, work: Path) -> dict:
    env = dict(os.environ)
    env.update({
        "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(work / "hf-datasets-cache"), "WANDB_DISABLED": "true",
        "DS_ACCELERATOR": "cpu",
    })
    env.pop("RLHF_DEBUG", None)
    return env


def rlhf_command() -> str:
    """Our CLI: the `rlhf` script beside this Python, else the one on PATH."""
    rlhf = Path(sys.executable).with_name("rlhf")
    return str(rlhf) if rlhf.exists() else shutil.which("rlhf") or "rlhf"


def fail(side: str, measured: Measured, log_file: Path) -> None:
    tail = "\n".join(measured.output.splitlines()[-30:])
    raise SystemExit(f"{side} run failed (exit {measured.returncode}); log: {log_file}\n{tail}")


def read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# ----------------------------------------------------------------------------------- timed windows


def step_markers(warmup_steps: int, steps: int, begin: str) -> tuple[str, str]:
    """The lines that open and close the timed window ("step N/TOTAL", printed by both sides)."""
    total = warmup_steps + steps
    return (f"step {warmup_steps}/{total}" if warmup_steps else begin), f"step {total}/{total}"


def between(measured: Measured, first: str, last: str, what: int) -> float:
    """Wall (what=0) or CPU (what=1) seconds between two marker lines, as the parent saw them."""
    missing = [m for m in (first, last) if m not in measured.marks]
    if missing:
        raise SystemExit(f"no line starting with {missing[0]!r} in the output; see the log")
    return measured.marks[last][what] - measured.marks[first][what]


def timings(measured: Measured, warmup_steps: int, steps: int, begin: str) -> dict:
    """The same clock for both sides: the parent's, when it reads each side's "step N/TOTAL" lines."""
    first, last = step_markers(warmup_steps, steps, begin)
    return {"steady_s": between(measured, first, last, 0), "steady_cpu_s": between(measured, first, last, 1),
            "loop_s": between(measured, begin, last, 0)}


def in_process_seconds(metric_rows: list[dict], rate_key: str, step_weights: list[float],
                       warmup_steps: int) -> float:
    """Seconds of the timed steps by our CLI's own clock: each log row's `rate_key` is the weight
    of its window (tokens, pairs) over the seconds its training steps took."""
    seconds, previous = 0.0, 0
    for m in metric_rows:
        if m["step"] > warmup_steps:
            seconds += sum(step_weights[previous:m["step"]]) / m[rate_key]
        previous = m["step"]
    return seconds


def check_window(args, p: argparse.ArgumentParser) -> None:
    if args.steps < 1 or args.warmup_steps < 0 or args.log_every < 1:
        p.error("--steps must be >= 1, --warmup-steps >= 0, --log-every >= 1")
    if args.warmup_steps % args.log_every or args.steps % args.log_every:
        p.error("--warmup-steps and --steps must be multiples of --log-every: our CLI prints its "
                "'step N/TOTAL' lines, which time the window, only at log steps")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")


# ---------------------------------------------------------------------------------------- summaries


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summarize_steps(runs: list[dict], timed_batches: list[dict], steps: int) -> dict:
    """Best of the repeats for a side timed over `steps` optimizer steps (`timed_batches`: the token
    counts of those steps): on a shared machine, other load only ever makes a run slower."""
    trained = sum(b["trained_tokens"] for b in timed_batches)
    inputs = sum(b["input_tokens"] for b in timed_batches)
    best = min(runs, key=lambda r: r["steady_s"])
    steady_s, cpu = best["steady_s"], best["steady_cpu_s"]
    return {
        "steady_s": steady_s,
        "steady_s_in_process": best["steady_s_in_process"],
        "steady_cpu_s": cpu,
        "cpu_utilisation": cpu / steady_s if cpu is not None else None,
        "steps_per_sec": steps / steady_s,
        "sec_per_step": steady_s / steps,
        "trained_tokens_per_sec": trained / steady_s,
        "input_tokens_per_sec": inputs / steady_s,
        "loop_s": min(r["loop_s"] for r in runs),
        "process_wall_s": min(r["measured"].wall_s for r in runs),
        "process_cpu_s": min(r["measured"].cpu_s for r in runs),
        "peak_rss_mib": max(r["measured"].peak_rss for r in runs) / 2**20,
        "sampled_peak_rss_mib": max(r["measured"].sampled_peak_rss for r in runs) / 2**20,
        "rss_before_train_mib": median([r["rss_before_train"] for r in runs]) / 2**20,
        "final_loss": runs[-1]["final_loss"],
        "runs": [{"steady_s": r["steady_s"], "steady_s_in_process": r["steady_s_in_process"],
                  "steady_cpu_s": r["steady_cpu_s"], "loop_s": r["loop_s"],
                  "process_wall_s": r["measured"].wall_s, "peak_rss_mib": r["measured"].peak_rss / 2**20,
                  "loadavg_before": r["loadavg_before"]}
                 for r in runs],
    }


def clock_check(sides: dict[str, dict]) -> str:
    """Whether the step lines (the parent's clock) and each side's own clock agree within 5%."""
    notes = []
    for name, side in sides.items():
        inside = side["steady_s_in_process"]
        if abs(inside - side["steady_s"]) > 0.05 * side["steady_s"]:
            notes.append(f"{name}: timed steps {side['steady_s']:.1f}s by the step lines, "
                         f"{inside:.1f}s by its own clock")
    return "; ".join(notes) or "the step lines and each side's own clock agree within 5%"


def contention(sides: dict[str, dict], threads: int) -> str:
    """A warning when a side kept less than 80% of its threads busy: other processes took the CPUs
    and the timings say more about the machine's load than about the trainers."""
    starved = [f"{name} {side['cpu_utilisation']:.2f}" for name, side in sides.items()
               if side["cpu_utilisation"] is not None and side["cpu_utilisation"] < 0.8 * threads]
    if not starved:
        return ""
    return (f"CPU utilisation in the timed steps ({', '.join(starved)} of {threads} cores) suggests other "
            "load on the machine; compare the times with care or use --repeats")


def ratios(ours: dict, theirs: dict, keys) -> dict:
    return {k: ours[k] / theirs[k] for k in keys if ours.get(k) is not None and theirs.get(k)}


# ------------------------------------------------------------------------------------- work dirs


def make_work_dir(keep: Path | None, prefix: str) -> Path:
    import tempfile

    work = Path(tempfile.mkdtemp(prefix=prefix)) if keep is None else keep
    work.mkdir(parents=True, exist_ok=True)
    return work


@contextmanager
def work_dir(keep: Path | None, prefix: str):
    """`keep`, or a fresh temporary directory removed afterwards."""
    work = make_work_dir(keep, prefix)
    try:
        yield work
    finally:
        if keep is None:
            shutil.rmtree(work, ignore_errors=True)


def alternate(sides: list[str], repeats: int, run_side) -> dict[str, list[dict]]:
    """Run every side `repeats` times, alternating; each result gets the load average before it."""
    runs: dict[str, list[dict]] = {side: [] for side in sides}
    for run in range(repeats):
        for side in sides:
            load = loadavg()
            print(f"run {run + 1}/{repeats}: {side} (load average {load:.2f}) ...", flush=True)
            result = run_side(side, run)
            result["loadavg_before"] = load
            runs[side].append(result)
            measured = result["measured"]
            print(f"  timed steps {result['steady_s']:.1f}s, loop {result['loop_s']:.1f}s, process "
                  f"{measured.wall_s:.1f}s, peak RSS {measured.peak_rss / 2**20:.0f} MiB", flush=True)
    return runs
