"""SFT with LoRA: our CLI against trl's SFTTrainer, same model, data, lengths and batches.

    .venv/bin/python benchmarks/bench_sft.py [--steps 30] [--warmup-steps 10] [--json-out FILE]

Both sides train `builtin:small` (a 19.5M-parameter LLaMA with a 32000-entry vocabulary, in fp32 on
the CPU) with LoRA r=16, alpha=32, dropout 0.05 on every linear layer of the blocks, lr 2e-4 with a
cosine schedule, batch 8, no accumulation, no packing, no gradient checkpointing, max_length 256, on
the completions of real Anthropic HH-RLHF (harmless) transcripts with the prompt masked out.

Fairness:
- each side runs in its own fresh process (`rlhf sft ...` and `_trl_sft_runner.py`), with the same
  number of torch threads (OMP_NUM_THREADS / MKL_NUM_THREADS and torch.set_num_threads);
- both see the same batches in the same order: the bench computes our tool's batch order (seeded
  shuffle) and hands trl the rows in that order with a sequential sampler;
- the token ids and labels are checked example by example and the token counts batch by batch;
  the one difference is in responses cut at max_length, whose last kept token ours replaces by
  the EOS (trained) where trl keeps the response's token (trained): same lengths, same counts;
- rows whose prompt alone does not leave room for a response within max_length are left out, since
  the two tools drop those differently (ours: prompt + at least 1 token + EOS; trl: whatever keeps
  at least 1 trained token after cutting at max_length).

Time: the first `--warmup-steps` optimizer steps are excluded; throughput is measured over the next
`--steps` steps, on one clock for both sides: the bench's, when it reads the "step N/TOTAL" line each
side prints after step N (our CLI at every log step, the trl runner after every step). Each side's
own clock (our `tokens_per_sec` in metrics.jsonl, a trl callback) is a cross-check. With
`--repeats N` the sides alternate and the fastest run of each counts (other load on a shared
machine only ever slows a run down). The whole training loop and the whole process are also given.
Memory: the peak RSS of each process (`ru_maxrss` from wait4), and its RSS when training starts.
"""

from __future__ import annotations

import argparse
import gzip
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().parent / "_trl_sft_runner.py"
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "hh-harmless-dev.jsonl.gz"  # ../shared beside the repo
ASSISTANT = "\n\nAssistant:"
OURS_BEGIN = "model: "  # our CLI's line once the model and its adapter are built, before training
TRL_BEGIN = "TRAIN_BEGIN"  # printed by the trl runner in on_train_begin


# ---------------------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path, default=Path(os.environ.get("RLHF_BENCH_DATA", DEFAULT_DATA)),
                   help="HH-RLHF jsonl(.gz) with a 'chosen' field (default: %(default)s)")
    p.add_argument("--rows", type=int, default=2000,
                   help="at most this many usable rows (default: %(default)s)")
    p.add_argument("--model", default="small", help="built-in model size (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=10,
                   help="untimed steps before them; a multiple of --log-every (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)),
                   help="torch threads on both sides (default: the CPUs this process may use, %(default)s)")
    p.add_argument("--repeats", type=int, default=1,
                   help="run each side this many times, alternating; the fastest run of each counts, "
                   "the largest peak RSS (default: 1)")
    p.add_argument("--trl-first", action="store_true", help="start with trl instead of our tool")
    p.add_argument("--json-out", type=Path, help="also write the results as JSON here")
    p.add_argument("--keep", type=Path, help="keep data, recipes, run dirs and logs in this directory")
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup_steps < 0 or args.log_every < 1:
        p.error("--steps must be >= 1, --warmup-steps >= 0, --log-every >= 1")
    if args.warmup_steps % args.log_every or args.steps % args.log_every:
        p.error("--warmup-steps and --steps must be multiples of --log-every: our CLI prints its "
                "'step N/TOTAL' lines, which time the window, only at log steps")
    return args


# --------------------------------------------------------------------------------------------- data


def split_chosen(text: str) -> tuple[str, str] | None:
    """HH transcript -> (prompt up to and including the last "\\n\\nAssistant:", response)."""
    at = text.rfind(ASSISTANT)
    if at < 0:
        return None
    cut = at + len(ASSISTANT)
    return text[:cut], text[cut:]


def read_hh(path: Path) -> list[dict]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def usable_rows(raw: list[dict], tokenizer, max_length: int, limit: int) -> tuple[list[dict], dict]:
    """prompt/response rows both tools keep unchanged in number; counts of what was left out."""
    rows, skipped = [], {"no assistant turn": 0, "empty response": 0, "prompt too long": 0}
    for item in raw:
        parts = split_chosen(item["chosen"])
        if parts is None:
            skipped["no assistant turn"] += 1
            continue
        prompt, response = parts
        if not response.strip():
            skipped["empty response"] += 1
            continue
        # BOS + prompt must leave room for one response token and the EOS (ours drops the row
        # otherwise; trl would keep a row with a single trained token).
        if len(tokenizer(prompt, verbose=False)["input_ids"]) > max_length - 2:
            skipped["prompt too long"] += 1
            continue
        rows.append({"prompt": prompt, "response": response})
        if len(rows) == limit:
            break
    return rows, skipped


@dataclass
class Plan:
    """What both sides train on: our tokenization, batch order and per-step token counts."""

    examples: list[dict]  # per row: input_ids and labels, as our tool tokenizes them
    order: list[int]  # row index of every example, batch after batch
    batches: list[dict] = field(default_factory=list)  # per step: trained / input / padded tokens
    truncated: int = 0


def make_plan(rows: list[dict], tokenizer, args, total_steps: int) -> Plan:
    """Tokenize with our tool's own code and take its batch order, so the timing can be checked."""
    from rlhf_cli.data.collate import pad_batch
    from rlhf_cli.data.sft import build_sft_dataset
    from rlhf_cli.engine.batching import GlobalBatches
    from rlhf_cli.stages.sft import trained_tokens

    examples, report = build_sft_dataset(rows, tokenizer, "plain", args.max_length, None, source="bench")
    if report.kept != len(rows):
        raise SystemExit(f"our tool would drop rows ({report.summary()}); the plan assumes none")
    batches = GlobalBatches(len(examples), args.batch_size, 1, 1, 0, args.seed)
    plan = Plan(examples=[{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples],
                order=[], truncated=report.truncated.get("response", 0))
    for step in range(total_steps):
        (idx,) = batches.micro_batches(step)
        batch = pad_batch([examples[i] for i in idx], pad_token_id=tokenizer.pad_token_id)
        plan.order += idx
        plan.batches.append({"trained_tokens": trained_tokens(batch),
                             "input_tokens": int(batch["attention_mask"].sum()),
                             "padded_tokens": int(batch["input_ids"].numel())})
    return plan


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")


def our_recipe(args, train_file: Path, total_steps: int) -> str:
    return f"""stage: sft
model:
  base: builtin:{args.model}
  dtype: fp32
  lora: {{r: {args.lora_r}, alpha: {args.lora_alpha}, dropout: {args.lora_dropout}, target_modules: auto}}
data:
  train: {json.dumps(str(train_file))}
  format: prompt_response
  template: plain
  max_length: {args.max_length}
sft:
  completion_only: true
train:
  lr: {args.lr}
  schedule: cosine
  warmup_steps: 0
  batch_size: {args.batch_size}
  grad_accum: 1
  max_steps: {total_steps}
  seed: {args.seed}
  log_every: {args.log_every}
  max_grad_norm: 1.0
  weight_decay: 0.0
launch:
  launcher: none
  cpu: true
"""


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

    def sample() -> None:
        while not state["done"]:
            state["sampled"] = max(state["sampled"], rss())
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
                    output=output, returncode=proc.returncode)


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


def fail(side: str, measured: Measured, log_file: Path) -> None:
    tail = "\n".join(measured.output.splitlines()[-30:])
    raise SystemExit(f"{side} run failed (exit {measured.returncode}); log: {log_file}\n{tail}")


def step_markers(args, begin: str) -> tuple[str, str]:
    """The lines that open and close the timed window ("step N/TOTAL", printed by both sides)."""
    total = args.warmup_steps + args.steps
    return (f"step {args.warmup_steps}/{total}" if args.warmup_steps else begin), f"step {total}/{total}"


def between(measured: Measured, first: str, last: str, what: int) -> float:
    """Wall (what=0) or CPU (what=1) seconds between two marker lines, as the parent saw them."""
    missing = [m for m in (first, last) if m not in measured.marks]
    if missing:
        raise SystemExit(f"no line starting with {missing[0]!r} in the output; see the log")
    return measured.marks[last][what] - measured.marks[first][what]


def timings(measured: Measured, args, begin: str) -> dict:
    """The same clock for both sides: the parent's, when it reads each side's "step N/TOTAL" lines."""
    first, last = step_markers(args, begin)
    return {"steady_s": between(measured, first, last, 0), "steady_cpu_s": between(measured, first, last, 1),
            "loop_s": between(measured, begin, last, 0)}


def run_ours(args, plan: Plan, work: Path, recipe: Path, run: int) -> dict:
    rlhf = Path(sys.executable).with_name("rlhf")
    argv = [str(rlhf) if rlhf.exists() else shutil.which("rlhf") or "rlhf",
            "sft", "--recipe", str(recipe), "-o", str(work / f"ours-run{run}"), "--overwrite"]
    log = work / f"ours-run{run}.log"
    markers = [OURS_BEGIN, *step_markers(args, OURS_BEGIN)]
    measured = run_measured(argv, child_env(args.threads, work), markers, log)
    if measured.returncode != 0:
        fail("our", measured, log)
    metrics_file = work / f"ours-run{run}" / "metrics.jsonl"
    metrics = [json.loads(line) for line in metrics_file.read_text().splitlines() if line.strip()]
    train_rows = [m for m in metrics if m.get("split") != "eval" and "tokens_per_sec" in m]
    # Cross-check from the tool's own metric: tokens_per_sec is the trained tokens of the log window
    # over the seconds its training steps took; the plan knows each step's trained tokens.
    in_process, previous = 0.0, 0
    for m in train_rows:
        if m["step"] > args.warmup_steps:
            tokens = sum(b["trained_tokens"] for b in plan.batches[previous:m["step"]])
            in_process += tokens / m["tokens_per_sec"]
        previous = m["step"]
    return {
        "measured": measured,
        **timings(measured, args, OURS_BEGIN),
        "steady_s_in_process": in_process,
        "final_loss": train_rows[-1]["loss"],
        "rss_before_train": measured.marks.get(OURS_BEGIN, (0, 0, 0))[2],
        "kept_line": next((line.strip() for line in measured.output.splitlines()
                           if "data.train:" in line), ""),
        "batches": None,  # ours: the plan's (computed with the tool's own tokenizer, template and batcher)
        "examples": None,
    }


def run_trl(args, work: Path, data: Path, run: int) -> dict:
    report_file = work / f"trl-run{run}.json"
    argv = [sys.executable, str(RUNNER), "--model", args.model_dir, "--data", str(data),
            "--output-dir", str(work / f"trl-run{run}"), "--report", str(report_file),
            "--max-steps", str(args.warmup_steps + args.steps), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--lr", str(args.lr), "--lora-r", str(args.lora_r),
            "--lora-alpha", str(args.lora_alpha), "--lora-dropout", str(args.lora_dropout),
            "--log-every", str(args.log_every), "--seed", str(args.seed), "--threads", str(args.threads)]
    log = work / f"trl-run{run}.log"
    markers = [TRL_BEGIN, *step_markers(args, TRL_BEGIN)]
    measured = run_measured(argv, child_env(args.threads, work), markers, log)
    if measured.returncode != 0:
        fail("trl", measured, log)
    report = json.loads(report_file.read_text())
    total = args.warmup_steps + args.steps
    times = [0.0, *report["step_times"]]  # seconds after on_train_begin, at the end of each step
    losses = [row["loss"] for row in report["logs"] if "loss" in row]
    return {
        "measured": measured,
        **timings(measured, args, TRL_BEGIN),
        # cross-check from a callback's clock inside the process
        "steady_s_in_process": times[total] - times[args.warmup_steps],
        "final_loss": losses[-1] if losses else None,
        "rss_before_train": report["rss_before_train"],
        "batches": report["batches"],
        "examples": report["examples"],
        "threads": report["threads"],
        "trainable_params": report["trainable_params"],
    }


# ----------------------------------------------------------------------------------------- checking


def same_example(ours: dict, trl: dict, eos_id: int) -> str | None:
    """"same", "last" (equal but for the final token, where ours puts the EOS of a response cut at
    max_length and trl keeps the cut response's token) or None (different)."""
    if ours == trl:
        return "same"
    a, b = ours["input_ids"], trl["input_ids"]
    if (len(a) == len(b) and a[:-1] == b[:-1] and ours["labels"][:-1] == trl["labels"][:-1]
            and a[-1] == eos_id and ours["labels"][-1] == eos_id and trl["labels"][-1] == b[-1]):
        return "last"
    return None


def check_tokens(plan: Plan, trl: dict, args, eos_id: int) -> tuple[list[str], dict]:
    """Differences between what the two sides trained on (none when the tokens match)."""
    problems = []
    ours_examples = [plan.examples[i] for i in plan.order]
    counts = {"same": 0, "last": 0}
    if len(trl["examples"]) != len(ours_examples):
        problems.append(f"trl prepared {len(trl['examples'])} examples, ours {len(ours_examples)}")
    else:
        verdicts = [same_example(a, b, eos_id)
                    for a, b in zip(ours_examples, trl["examples"], strict=True)]
        for verdict in verdicts:
            if verdict is not None:
                counts[verdict] += 1
        diff = [i for i, v in enumerate(verdicts) if v is None]
        if diff:
            i = diff[0]
            problems.append(f"{len(diff)} examples differ in tokens or labels, e.g. #{i}: ours "
                            f"{len(ours_examples[i]['input_ids'])} tokens, trl "
                            f"{len(trl['examples'][i]['input_ids'])}")
    total = args.warmup_steps + args.steps
    if trl["batches"][:total] != plan.batches[:total]:
        diff = [i for i, (a, b) in enumerate(zip(plan.batches, trl["batches"], strict=False)) if a != b]
        problems.append(f"{len(diff)} batches differ, e.g. step {diff[0] + 1 if diff else '?'}")
    return problems, counts


# ---------------------------------------------------------------------------------------- reporting


def median(values: list[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def summarize(runs: list[dict], plan: Plan, args) -> dict:
    timed = plan.batches[args.warmup_steps:args.warmup_steps + args.steps]
    trained = sum(b["trained_tokens"] for b in timed)
    inputs = sum(b["input_tokens"] for b in timed)
    # Best of the repeats: on a shared machine, other load only ever makes a run slower.
    best = min(runs, key=lambda r: r["steady_s"])
    steady_s = best["steady_s"]
    cpu = best["steady_cpu_s"]
    return {
        "steady_s": steady_s,
        "steady_s_in_process": best["steady_s_in_process"],
        "steady_cpu_s": cpu,
        "cpu_utilisation": cpu / steady_s if cpu is not None else None,
        "steps_per_sec": args.steps / steady_s,
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


def versions() -> dict:
    from importlib import metadata

    out = {"python": platform.python_version()}
    for name in ("rlhf-cli", "torch", "transformers", "peft", "trl", "accelerate", "datasets"):
        try:
            out[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            out[name] = None
    return out


def print_table(result: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    ours, trl, ratio = result["ours"], result["trl"], result["ratio_ours_over_trl"]
    s = result["setup"]
    table = Table(title=f"SFT + LoRA, builtin:{s['model']} ({s['params'] / 1e6:.1f}M params, vocab "
                        f"{s['vocab']}), batch {s['batch_size']}, max_length {s['max_length']}, "
                        f"{s['threads']} threads, {s['timed_steps']} timed steps after {s['warmup_steps']}, "
                        f"best of {s['repeats']} run(s) per side")
    table.add_column("metric")
    table.add_column("ours", justify="right")
    table.add_column("trl SFTTrainer", justify="right")
    table.add_column("ours / trl", justify="right")
    rows = [
        ("steps/s (timed steps)", "steps_per_sec", "{:.3f}"),
        ("trained tokens/s", "trained_tokens_per_sec", "{:.0f}"),
        ("input tokens/s (non-pad)", "input_tokens_per_sec", "{:.0f}"),
        ("timed steps, s", "steady_s", "{:.1f}"),
        ("timed steps, CPU s", "steady_cpu_s", "{:.1f}"),
        ("CPU utilisation (cores busy)", "cpu_utilisation", "{:.2f}"),
        ("whole training loop, s", "loop_s", "{:.1f}"),
        ("whole process, s", "process_wall_s", "{:.1f}"),
        ("process CPU time, s", "process_cpu_s", "{:.1f}"),
        ("peak RSS, MiB", "peak_rss_mib", "{:.0f}"),
        ("RSS when training starts, MiB", "rss_before_train_mib", "{:.0f}"),
        ("peak RSS - RSS at start, MiB", "train_rss_growth_mib", "{:.0f}"),
        ("mean loss, last logged window", "final_loss", "{:.3f}"),
    ]

    def cell(value, fmt):
        return "n/a" if value is None else fmt.format(value)

    for label, key, fmt in rows:
        table.add_row(label, cell(ours[key], fmt), cell(trl[key], fmt), cell(ratio.get(key), "{:.2f}"))
    console = Console()
    console.print(table)
    console.print(f"tokens: {s['token_check']}")
    console.print(f"clocks: {s['clock_check']}")
    console.print(f"speed-up ours vs trl: {ratio['steps_per_sec']:.2f}x; peak memory ours/trl: "
                  f"{ratio['peak_rss_mib']:.2f}")
    if s["contended"]:
        console.print(f"[bold yellow]warning:[/] {s['contended']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from rlhf_cli.builtin.model import build_config as builtin_config
    from rlhf_cli.builtin.model import count_params, materialize
    from rlhf_cli.models.loading import load_tokenizer

    model_dir = materialize(args.model)  # before any timing: both sides load the same directory
    args.model_dir = str(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    rows, skipped = usable_rows(read_hh(args.data), tokenizer, args.max_length, args.rows)
    total_steps = args.warmup_steps + args.steps
    if len(rows) < total_steps * args.batch_size:
        raise SystemExit(f"only {len(rows)} usable rows; {total_steps} steps of {args.batch_size} need "
                         f"{total_steps * args.batch_size} (lower --steps or --batch-size)")
    plan = make_plan(rows, tokenizer, args, total_steps)

    work = Path(tempfile.mkdtemp(prefix="rlhf-bench-sft-")) if args.keep is None else args.keep
    work.mkdir(parents=True, exist_ok=True)
    try:
        ours_data, trl_data, recipe = work / "sft.jsonl", work / "sft-trl.jsonl", work / "recipe.yaml"
        write_jsonl(ours_data, rows)
        # trl gets the rows of the planned batches, in order, as prompt-completion data
        write_jsonl(trl_data, [{"prompt": rows[i]["prompt"], "completion": rows[i]["response"]}
                               for i in plan.order])
        recipe.write_text(our_recipe(args, ours_data, total_steps), encoding="utf-8")
        print(f"data: {len(rows)} rows from {args.data} (left out: "
              + ", ".join(f"{n} {why}" for why, n in skipped.items() if n) + f"); {plan.truncated} responses "
              f"truncated to max_length; {total_steps} steps x {args.batch_size} rows; work dir {work}",
              flush=True)

        runs: dict[str, list[dict]] = {"ours": [], "trl": []}
        sides = ["trl", "ours"] if args.trl_first else ["ours", "trl"]
        for run in range(args.repeats):
            for side in sides:
                load = os.getloadavg()[0]
                print(f"run {run + 1}/{args.repeats}: {side} (load average {load:.2f}) ...", flush=True)
                result = run_ours(args, plan, work, recipe, run) if side == "ours" else \
                    run_trl(args, work, trl_data, run)
                result["loadavg_before"] = load
                runs[side].append(result)
                measured = result["measured"]
                print(f"  timed steps {result['steady_s']:.1f}s, loop {result['loop_s']:.1f}s, process "
                      f"{measured.wall_s:.1f}s, peak RSS {measured.peak_rss / 2**20:.0f} MiB", flush=True)

        problems, counts = check_tokens(plan, runs["trl"][0], args, tokenizer.eos_token_id)
        timed = plan.batches[args.warmup_steps:total_steps]
        token_check = (
            "MISMATCH: " + "; ".join(problems) if problems else
            f"same batches on both sides: {len(plan.order)} examples, "
            f"{sum(b['trained_tokens'] for b in timed)} trained / {sum(b['input_tokens'] for b in timed)} "
            f"input / {sum(b['padded_tokens'] for b in timed)} padded tokens in the timed steps; "
            f"{counts['same']} examples with identical ids and labels, {counts['last']} cut at max_length "
            "that differ only in the last token (ours: EOS, trl: the cut response's next token)"
        )
        ours, trl = summarize(runs["ours"], plan, args), summarize(runs["trl"], plan, args)
        clock_notes = []
        for name, side in (("ours", ours), ("trl", trl)):
            inside = side["steady_s_in_process"]
            if abs(inside - side["steady_s"]) > 0.05 * side["steady_s"]:
                clock_notes.append(f"{name}: timed steps {side['steady_s']:.1f}s by the step lines, "
                                   f"{inside:.1f}s by its own clock")
        for side in (ours, trl):
            side["train_rss_growth_mib"] = side["peak_rss_mib"] - side["rss_before_train_mib"]
        # Each side should keep its threads busy; much less means other processes took the CPUs and
        # the timings say more about the machine's load than about the two trainers.
        busy = {name: side["cpu_utilisation"] for name, side in (("ours", ours), ("trl", trl))}
        starved = [f"{name} {value:.2f}" for name, value in busy.items()
                   if value is not None and value < 0.8 * args.threads]
        contended = (f"CPU utilisation in the timed steps ({', '.join(starved)} of {args.threads} cores) "
                     "suggests other load on the machine; compare the times with care or use --repeats"
                     if starved else "")
        keys = ("steps_per_sec", "trained_tokens_per_sec", "input_tokens_per_sec", "steady_s",
                "steady_cpu_s", "loop_s",
                "process_wall_s", "process_cpu_s", "peak_rss_mib", "rss_before_train_mib",
                "train_rss_growth_mib")
        config = builtin_config(args.model)
        result = {
            "benchmark": "sft-lora",
            "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "machine": {"cpus": os.cpu_count(), "platform": platform.platform(),
                        "processor": platform.processor() or platform.machine()},
            "versions": versions(),
            "setup": {
                "model": args.model, "params": count_params(args.model), "vocab": config.vocab_size,
                "batch_size": args.batch_size, "max_length": args.max_length, "threads": args.threads,
                "timed_steps": args.steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats,
                "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                         "target_modules": "all-linear"},
                "lr": args.lr, "seed": args.seed, "rows": len(rows), "rows_left_out": skipped,
                "responses_truncated": plan.truncated, "token_check": token_check,
                "clock_check": "; ".join(clock_notes) or "the step lines and each side's own clock agree "
                               "within 5%",
                "contended": contended,
                "trl_threads": runs["trl"][0]["threads"],
                "trl_trainable_params": runs["trl"][0]["trainable_params"],
                "ours_data_line": runs["ours"][0]["kept_line"],
            },
            "ours": ours,
            "trl": trl,
            "ratio_ours_over_trl": {k: ours[k] / trl[k] for k in keys if ours[k] is not None and trl[k]},
        }
        print_table(result)
        if args.json_out:
            args.json_out.parent.mkdir(parents=True, exist_ok=True)
            args.json_out.write_text(json.dumps(result, indent=1) + "\n", encoding="utf-8")
            print(f"wrote {args.json_out}")
        return 1 if problems else 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
