"""What bench_sft.py and bench_dpo.py share: our CLI against a trl trainer on the same plan (our
tool's tokens and batch order), one run of each side, the token check, the result and its table.

Nothing here imports torch at import time; the plan is made with our tool's own code in the parent.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    OURS_BEGIN,
    ROOT,
    TRL_BEGIN,
    add_size_args,
    alternate,
    check_window,
    child_env,
    clock_check,
    contention,
    fail,
    in_process_seconds,
    ratios,
    read_metrics,
    rlhf_command,
    run_measured,
    step_markers,
    summarize_steps,
    timings,
)
from _report import compare_rows, header, print_rows

# ---------------------------------------------------------------------------------------- arguments


def add_run_args(p: argparse.ArgumentParser, *, lr: float, batch_help: str | None = None) -> None:
    """The model, the timed window and the sizes both benches take."""
    p.add_argument("--model", default="small", help="built-in model size (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=10,
                   help="untimed steps before them; a multiple of --log-every (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=10)
    add_size_args(p, lr=lr, batch_help=batch_help)


def parse_run_args(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Add --trl-first, parse and check the timed window."""
    p.add_argument("--trl-first", action="store_true", help="start with trl instead of our tool")
    args = p.parse_args(argv)
    check_window(args, p)
    return args


# --------------------------------------------------------------------------------------------- data


def load_model(args):
    """Materialize the built-in model (before any timing: both sides load the same directory) and
    return our tokenizer; `args.model_dir` names the directory."""
    sys.path.insert(0, str(ROOT))
    from rlhf_cli.builtin.model import materialize
    from rlhf_cli.models.loading import load_tokenizer

    model_dir = materialize(args.model)
    args.model_dir = str(model_dir)
    return load_tokenizer(str(model_dir))


def check_enough(found: int, args, what: str) -> None:
    """Stop unless `found` usable rows (pairs) fill every step, warm-up included."""
    total_steps = args.warmup_steps + args.steps
    needed = total_steps * args.batch_size
    if found < needed:
        raise SystemExit(f"only {found} usable {what}; {total_steps} steps of {args.batch_size} need "
                         f"{needed} (lower --steps or --batch-size)")


@dataclass
class Plan:
    """What both sides train on: our tokenization, batch order and per-step token counts."""

    # {input_ids, labels} as our tool has them: per row (SFT), or per pair chosen then rejected (DPO)
    examples: list[dict]
    order: list[int]  # row (pair) index of every example, batch after batch
    batches: list[dict] = field(default_factory=list)  # per step: trained / input / padded tokens
    truncated: int | dict = 0


def plan_batches(items: list, report, rows: int, examples: list[dict], truncated, args, total_steps: int,
                 collate, trained_tokens) -> Plan:
    """Our tool's batch order over `items` (its dataset, built from `rows` rows with `report`) and the
    token counts of every step, with `collate` (a list of items -> a padded batch) and
    `trained_tokens` (a batch -> the tokens with a loss)."""
    from rlhf_cli.engine.batching import GlobalBatches

    if report.kept != rows:
        raise SystemExit(f"our tool would drop rows ({report.summary()}); the plan assumes none")
    batches = GlobalBatches(len(items), args.batch_size, 1, 1, 0, args.seed)
    plan = Plan(examples=examples, order=[], truncated=truncated)
    for step in range(total_steps):
        (idx,) = batches.micro_batches(step)
        batch = collate([items[i] for i in idx])
        plan.order += idx
        plan.batches.append({"trained_tokens": trained_tokens(batch),
                             "input_tokens": int(batch["attention_mask"].sum()),
                             "padded_tokens": int(batch["input_ids"].numel())})
    return plan


def lora_recipe(args, stage: str, train_file: Path, total_steps: int, *, data: str, section: str) -> str:
    """Our recipe: `data` and `section` (the stage's own block) are YAML lines, each ending in a newline."""
    return f"""stage: {stage}
model:
  base: builtin:{args.model}
  dtype: fp32
  lora: {{r: {args.lora_r}, alpha: {args.lora_alpha}, dropout: {args.lora_dropout}, target_modules: auto}}
data:
  train: {json.dumps(str(train_file))}
{data}  template: plain
  max_length: {args.max_length}
{section}train:
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


def ours_argv(stage: str, recipe: Path, work: Path, run: int) -> list[str]:
    return [rlhf_command(), stage, "--recipe", str(recipe), "-o", str(work / f"ours-run{run}"), "--overwrite"]


def run_ours(args, stage: str, work: Path, recipe: Path, run: int, rate_key: str,
             step_weights: list[float]) -> tuple[dict, list[dict]]:
    """One run of our side, and the training rows of its metrics.jsonl. The cross-check comes from the
    tool's own metric: `rate_key` is the weight of each log window (`step_weights`: per step) over the
    seconds its training steps took."""
    log = work / f"ours-run{run}.log"
    markers = [OURS_BEGIN, *step_markers(args.warmup_steps, args.steps, OURS_BEGIN)]
    measured = run_measured(ours_argv(stage, recipe, work, run), child_env(args.threads, work), markers, log)
    if measured.returncode != 0:
        fail("our", measured, log)
    metrics = read_metrics(work / f"ours-run{run}" / "metrics.jsonl")
    train_rows = [m for m in metrics if m.get("split") != "eval" and rate_key in m]
    return {
        "measured": measured,
        **timings(measured, args.warmup_steps, args.steps, OURS_BEGIN),
        "steady_s_in_process": in_process_seconds(train_rows, rate_key, step_weights, args.warmup_steps),
        "final_loss": train_rows[-1]["loss"],
        "rss_before_train": measured.marks.get(OURS_BEGIN, (0, 0, 0))[2],
        "kept_line": next((line.strip() for line in measured.output.splitlines()
                           if "data.train:" in line), ""),
    }, train_rows


def trl_argv(args, runner: Path, work: Path, data: Path, run: int) -> list[str]:
    return [sys.executable, str(runner), "--model", args.model_dir, "--data", str(data),
            "--output-dir", str(work / f"trl-run{run}"), "--report", str(work / f"trl-run{run}.json"),
            "--max-steps", str(args.warmup_steps + args.steps), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--lr", str(args.lr), "--lora-r", str(args.lora_r),
            "--lora-alpha", str(args.lora_alpha), "--lora-dropout", str(args.lora_dropout),
            "--log-every", str(args.log_every), "--seed", str(args.seed), "--threads", str(args.threads)]


def run_trl(args, argv: list[str], work: Path, run: int) -> tuple[dict, dict, list[dict]]:
    """One run of the trl runner `argv`: the run, the runner's report and its logged rows with a loss."""
    log = work / f"trl-run{run}.log"
    markers = [TRL_BEGIN, *step_markers(args.warmup_steps, args.steps, TRL_BEGIN)]
    measured = run_measured(argv, child_env(args.threads, work), markers, log)
    if measured.returncode != 0:
        fail("trl", measured, log)
    report = json.loads((work / f"trl-run{run}.json").read_text())
    total = args.warmup_steps + args.steps
    times = [0.0, *report["step_times"]]  # seconds after on_train_begin, at the end of each step
    logs = [row for row in report["logs"] if "loss" in row]
    return {
        "measured": measured,
        **timings(measured, args.warmup_steps, args.steps, TRL_BEGIN),
        # cross-check from a callback's clock inside the process
        "steady_s_in_process": times[total] - times[args.warmup_steps],
        "final_loss": logs[-1]["loss"] if logs else None,
        "rss_before_train": report["rss_before_train"],
        "batches": report["batches"],
        "examples": report["examples"],
        "threads": report["threads"],
        "trainable_params": report["trainable_params"],
    }, report, logs


def run_sides(args, ours: list[str], trl: list[str], run_ours_side, run_trl_side) -> dict | None:
    """With --dry-run, print both commands (`ours`, `trl`: run 0's) and return None; else run both
    sides `--repeats` times, alternating, and return their runs."""
    if args.dry_run:
        print("ours:", " ".join(ours))
        print("trl: ", " ".join(trl))
        return None
    sides = ["trl", "ours"] if args.trl_first else ["ours", "trl"]
    return alternate(sides, args.repeats, lambda side, run: run_ours_side(run)
                     if side == "ours" else run_trl_side(run))


# ----------------------------------------------------------------------------------------- checking


def token_check(plan: Plan, ours_examples: list[dict], trl: dict, args, eos_id: int, *, counted: str,
                unit: str, loss: str, cut: str) -> tuple[list[str], str]:
    """Differences between what the two sides trained on (none when the tokens match) and the line
    that says so: `counted` the examples, `unit` what one is, `loss` where the loss is, `cut` what
    max_length cuts."""
    problems, counts = compare_examples(ours_examples, trl["examples"], eos_id)
    total = args.warmup_steps + args.steps
    problems += compare_batches(plan.batches, trl["batches"], total)
    if problems:
        return problems, "MISMATCH: " + "; ".join(problems)
    timed = plan.batches[args.warmup_steps:total]
    return problems, (
        f"same batches on both sides: {counted}, "
        f"{sum(b['trained_tokens'] for b in timed)} trained / {sum(b['input_tokens'] for b in timed)} "
        f"input / {sum(b['padded_tokens'] for b in timed)} padded tokens in the timed steps; "
        f"{counts['same']} {unit} with identical ids and {loss}, {counts['last']} cut at max_length "
        f"that differ only in the last token (ours: EOS, trl: the cut {cut}'s next token)")


# ---------------------------------------------------------------------------------------- reporting


def summarize_sides(runs: dict, plan: Plan, args) -> tuple[dict, dict]:
    """Best of the repeats of each side over the timed steps, with the RSS growth in training."""
    timed = plan.batches[args.warmup_steps:args.warmup_steps + args.steps]
    ours, trl = (summarize_steps(runs[side], timed, args.steps) for side in ("ours", "trl"))
    for side in (ours, trl):
        side["train_rss_growth_mib"] = side["peak_rss_mib"] - side["rss_before_train_mib"]
    return ours, trl


def result(benchmark: str, args, setup: dict, check: str, runs: dict, ours: dict, trl: dict,
           ratio_keys) -> dict:
    """The result: the header, the setup (the model, sizes and window, then the bench's own `setup`,
    then the checks and what each side said of itself), both sides and their ratios."""
    from rlhf_cli.builtin.model import build_config, count_params

    return {
        **header(benchmark),
        "setup": {
            "model": args.model, "params": count_params(args.model),
            "vocab": build_config(args.model).vocab_size,
            "batch_size": args.batch_size, "max_length": args.max_length, "threads": args.threads,
            "timed_steps": args.steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats,
            "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                     "target_modules": "all-linear"},
            **setup,
            "token_check": check,
            "clock_check": clock_check({"ours": ours, "trl": trl}),
            "contended": contention({"ours": ours, "trl": trl}, args.threads),
            "trl_threads": runs["trl"][0]["threads"],
            "trl_trainable_params": runs["trl"][0]["trainable_params"],
            "ours_data_line": runs["ours"][0]["kept_line"],
        },
        "ours": ours,
        "trl": trl,
        "ratio_ours_over_trl": ratios(ours, trl, ratio_keys),
    }


ROW_LABELS = {
    "steps_per_sec": ("steps/s (timed steps)", "{:.3f}"),
    "sec_per_step": ("s per step", "{:.3f}"),
    "trained_tokens_per_sec": ("trained tokens/s", "{:.0f}"),
    "input_tokens_per_sec": ("input tokens/s (non-pad)", "{:.0f}"),
    "steady_s": ("timed steps, s", "{:.1f}"),
    "steady_cpu_s": ("timed steps, CPU s", "{:.1f}"),
    "cpu_utilisation": ("CPU utilisation (cores busy)", "{:.2f}"),
    "loop_s": ("whole training loop, s", "{:.1f}"),
    "process_wall_s": ("whole process, s", "{:.1f}"),
    "process_cpu_s": ("process CPU time, s", "{:.1f}"),
    "peak_rss_mib": ("peak RSS, MiB", "{:.0f}"),
    "rss_before_train_mib": ("RSS when training starts, MiB", "{:.0f}"),
    "train_rss_growth_mib": ("peak RSS - RSS at start, MiB", "{:.0f}"),
    "first_loss": ("mean loss, first logged window", "{:.3f}"),
    "final_loss": ("mean loss, last logged window", "{:.3f}"),
}


def table_rows(keys, *, labels: dict | None = None, formats: dict | None = None) -> list[tuple]:
    """(label, key, format) for `keys`, from ROW_LABELS unless `labels` or `formats` say otherwise."""
    labels, formats = labels or {}, formats or {}
    return [(labels.get(k, ROW_LABELS[k][0]), k, formats.get(k, ROW_LABELS[k][1])) for k in keys]


def print_result(result: dict, kind: str, sizes: str, trainer: str, rows: list[tuple[str, str, str]], *,
                 speed_goal: str = "", memory_goal: str = "") -> None:
    """The table of `rows` (label, key, format) for both sides and their ratio, then the checks; the
    title names `kind` (SFT, DPO) and `sizes`."""
    from rich.console import Console

    ours, trl, ratio = result["ours"], result["trl"], result["ratio_ours_over_trl"]
    s = result["setup"]
    print_rows(f"{kind} + LoRA, builtin:{s['model']} ({s['params'] / 1e6:.1f}M params, vocab {s['vocab']}), "
               f"{sizes}, {s['threads']} threads, {s['timed_steps']} timed steps after {s['warmup_steps']}, "
               f"best of {s['repeats']} run(s) per side",
               ["metric", "ours", trainer, "ours / trl"], compare_rows(rows, [ours, trl], ratio))
    console = Console()
    console.print(f"tokens: {s['token_check']}")
    console.print(f"clocks: {s['clock_check']}")
    console.print(f"speed-up ours vs trl: {ratio['steps_per_sec']:.2f}x{speed_goal}; peak memory ours/trl: "
                  f"{ratio['peak_rss_mib']:.2f}{memory_goal}")
    if s["contended"]:
        console.print(f"[bold yellow]warning:[/] {s['contended']}")


# ----------------------------------------------------------------------------------------- checking


def same_example(ours: dict, trl: dict, eos_id: int) -> str | None:
    """"same", "last" (equal but for the final token, where ours puts the EOS of a response cut at
    max_length and trl keeps the cut response's token) or None (different). Both are
    `{"input_ids", "labels"}` with -100 where no loss."""
    if ours == trl:
        return "same"
    a, b = ours["input_ids"], trl["input_ids"]
    if (len(a) == len(b) and a[:-1] == b[:-1] and ours["labels"][:-1] == trl["labels"][:-1]
            and a[-1] == eos_id and ours["labels"][-1] == eos_id and trl["labels"][-1] == b[-1]):
        return "last"
    return None


def compare_examples(ours: list[dict], theirs: list[dict], eos_id: int) -> tuple[list[str], dict]:
    """Problems (none when every example matches) and the counts of "same" and "last" verdicts."""
    counts = {"same": 0, "last": 0}
    if len(theirs) != len(ours):
        return [f"trl prepared {len(theirs)} examples, ours {len(ours)}"], counts
    verdicts = [same_example(a, b, eos_id) for a, b in zip(ours, theirs, strict=True)]
    for verdict in verdicts:
        if verdict is not None:
            counts[verdict] += 1
    diff = [i for i, v in enumerate(verdicts) if v is None]
    if not diff:
        return [], counts
    i = diff[0]
    return [f"{len(diff)} examples differ in tokens or labels, e.g. #{i}: ours "
            f"{len(ours[i]['input_ids'])} tokens, trl {len(theirs[i]['input_ids'])}"], counts


def compare_batches(ours: list[dict], theirs: list[dict], total: int) -> list[str]:
    if theirs[:total] == ours[:total]:
        return []
    diff = [i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b]
    return [f"{len(diff)} batches differ, e.g. step {diff[0] + 1 if diff else '?'}"]
