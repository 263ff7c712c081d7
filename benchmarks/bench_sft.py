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
import json
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from _common import (
    OURS_BEGIN,
    ROOT,
    TRL_BEGIN,
    add_common_args,
    alternate,
    check_window,
    child_env,
    clock_check,
    compare_batches,
    compare_examples,
    compare_rows,
    contention,
    fail,
    header,
    in_process_seconds,
    make_work_dir,
    print_rows,
    ratios,
    read_hh,
    read_metrics,
    rlhf_command,
    run_measured,
    step_markers,
    summarize_steps,
    timings,
    write_json,
    write_jsonl,
)

RUNNER = Path(__file__).resolve().parent / "_trl_sft_runner.py"
ASSISTANT = "\n\nAssistant:"


# ---------------------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
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
    p.add_argument("--trl-first", action="store_true", help="start with trl instead of our tool")
    args = p.parse_args(argv)
    check_window(args, p)
    return args


# --------------------------------------------------------------------------------------------- data


def split_chosen(text: str) -> tuple[str, str] | None:
    """HH transcript -> (prompt up to and including the last "\\n\\nAssistant:", response)."""
    at = text.rfind(ASSISTANT)
    if at < 0:
        return None
    cut = at + len(ASSISTANT)
    return text[:cut], text[cut:]


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


def run_ours(args, plan: Plan, work: Path, recipe: Path, run: int) -> dict:
    argv = [rlhf_command(), "sft", "--recipe", str(recipe), "-o", str(work / f"ours-run{run}"), "--overwrite"]
    log = work / f"ours-run{run}.log"
    markers = [OURS_BEGIN, *step_markers(args.warmup_steps, args.steps, OURS_BEGIN)]
    measured = run_measured(argv, child_env(args.threads, work), markers, log)
    if measured.returncode != 0:
        fail("our", measured, log)
    metrics = read_metrics(work / f"ours-run{run}" / "metrics.jsonl")
    train_rows = [m for m in metrics if m.get("split") != "eval" and "tokens_per_sec" in m]
    # Cross-check from the tool's own metric: tokens_per_sec is the trained tokens of the log window
    # over the seconds its training steps took; the plan knows each step's trained tokens.
    in_process = in_process_seconds(train_rows, "tokens_per_sec",
                                    [b["trained_tokens"] for b in plan.batches], args.warmup_steps)
    return {
        "measured": measured,
        **timings(measured, args.warmup_steps, args.steps, OURS_BEGIN),
        "steady_s_in_process": in_process,
        "final_loss": train_rows[-1]["loss"],
        "rss_before_train": measured.marks.get(OURS_BEGIN, (0, 0, 0))[2],
        "kept_line": next((line.strip() for line in measured.output.splitlines()
                           if "data.train:" in line), ""),
        "batches": None,  # ours: the plan's (computed with the tool's own tokenizer, template and batcher)
        "examples": None,
    }


def trl_argv(args, work: Path, data: Path, run: int) -> list[str]:
    return [sys.executable, str(RUNNER), "--model", args.model_dir, "--data", str(data),
            "--output-dir", str(work / f"trl-run{run}"), "--report", str(work / f"trl-run{run}.json"),
            "--max-steps", str(args.warmup_steps + args.steps), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--lr", str(args.lr), "--lora-r", str(args.lora_r),
            "--lora-alpha", str(args.lora_alpha), "--lora-dropout", str(args.lora_dropout),
            "--log-every", str(args.log_every), "--seed", str(args.seed), "--threads", str(args.threads)]


def run_trl(args, work: Path, data: Path, run: int) -> dict:
    log = work / f"trl-run{run}.log"
    markers = [TRL_BEGIN, *step_markers(args.warmup_steps, args.steps, TRL_BEGIN)]
    measured = run_measured(trl_argv(args, work, data, run), child_env(args.threads, work), markers, log)
    if measured.returncode != 0:
        fail("trl", measured, log)
    report = json.loads((work / f"trl-run{run}.json").read_text())
    total = args.warmup_steps + args.steps
    times = [0.0, *report["step_times"]]  # seconds after on_train_begin, at the end of each step
    losses = [row["loss"] for row in report["logs"] if "loss" in row]
    return {
        "measured": measured,
        **timings(measured, args.warmup_steps, args.steps, TRL_BEGIN),
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


def check_tokens(plan: Plan, trl: dict, args, eos_id: int) -> tuple[list[str], dict]:
    """Differences between what the two sides trained on (none when the tokens match)."""
    problems, counts = compare_examples([plan.examples[i] for i in plan.order], trl["examples"], eos_id)
    problems += compare_batches(plan.batches, trl["batches"], args.warmup_steps + args.steps)
    return problems, counts


# ---------------------------------------------------------------------------------------- reporting

ROWS = [
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
RATIO_KEYS = ("steps_per_sec", "trained_tokens_per_sec", "input_tokens_per_sec", "steady_s", "steady_cpu_s",
              "loop_s", "process_wall_s", "process_cpu_s", "peak_rss_mib", "rss_before_train_mib",
              "train_rss_growth_mib")


def print_table(result: dict) -> None:
    from rich.console import Console

    ours, trl, ratio = result["ours"], result["trl"], result["ratio_ours_over_trl"]
    s = result["setup"]
    print_rows(f"SFT + LoRA, builtin:{s['model']} ({s['params'] / 1e6:.1f}M params, vocab "
               f"{s['vocab']}), batch {s['batch_size']}, max_length {s['max_length']}, "
               f"{s['threads']} threads, {s['timed_steps']} timed steps after {s['warmup_steps']}, "
               f"best of {s['repeats']} run(s) per side",
               ["metric", "ours", "trl SFTTrainer", "ours / trl"], compare_rows(ROWS, [ours, trl], ratio))
    console = Console()
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

    work = make_work_dir(args.keep, "rlhf-bench-sft-")
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
        if args.dry_run:
            print("ours:", " ".join([rlhf_command(), "sft", "--recipe", str(recipe), "-o",
                                     str(work / "ours-run0"), "--overwrite"]))
            print("trl: ", " ".join(trl_argv(args, work, trl_data, 0)))
            return 0

        sides = ["trl", "ours"] if args.trl_first else ["ours", "trl"]
        runs = alternate(sides, args.repeats, lambda side, run: run_ours(args, plan, work, recipe, run)
                         if side == "ours" else run_trl(args, work, trl_data, run))

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
        ours, trl = (summarize_steps(runs[side], timed, args.steps) for side in ("ours", "trl"))
        for side in (ours, trl):
            side["train_rss_growth_mib"] = side["peak_rss_mib"] - side["rss_before_train_mib"]
        config = builtin_config(args.model)
        result = {
            **header("sft-lora"),
            "setup": {
                "model": args.model, "params": count_params(args.model), "vocab": config.vocab_size,
                "batch_size": args.batch_size, "max_length": args.max_length, "threads": args.threads,
                "timed_steps": args.steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats,
                "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                         "target_modules": "all-linear"},
                "lr": args.lr, "seed": args.seed, "rows": len(rows), "rows_left_out": skipped,
                "responses_truncated": plan.truncated, "token_check": token_check,
                "clock_check": clock_check({"ours": ours, "trl": trl}),
                "contended": contention({"ours": ours, "trl": trl}, args.threads),
                "trl_threads": runs["trl"][0]["threads"],
                "trl_trainable_params": runs["trl"][0]["trainable_params"],
                "ours_data_line": runs["ours"][0]["kept_line"],
            },
            "ours": ours,
            "trl": trl,
            "ratio_ours_over_trl": ratios(ours, trl, RATIO_KEYS),
        }
        print_table(result)
        write_json(result, args.json_out)
        return 1 if problems else 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
