"""DPO with LoRA: our CLI against trl's DPOTrainer, same model, pairs, lengths and batches.

    .venv/bin/python benchmarks/bench_dpo.py [--steps 30] [--warmup-steps 10] [--repeats N]
                                             [--precompute-ref] [--json-out FILE]

Both sides train `builtin:small` (a 19.5M-parameter LLaMA with a 32000-entry vocabulary, in fp32 on
the CPU) with DPO (sigmoid loss, beta 0.1) and LoRA r=16, alpha=32, dropout 0 on every linear layer
of the blocks, lr 1e-4 with a cosine schedule, 8 pairs per step (16 sequences: chosen and rejected
in one forward), no accumulation, no gradient checkpointing, max_length 256, on real Anthropic
HH-RLHF (harmless) chosen/rejected transcripts.

Reference: the same model with the adapter disabled, recomputed every step on both sides (trl's
default with a `peft_config`; ours with `dpo.precompute_ref: false`). `--precompute-ref` switches
both sides to reference log-probs computed once before training (trl: `precompute_ref_log_probs`).
LoRA dropout is 0 because trl's DPOTrainer turns every dropout off (`disable_dropout=True`).

Fairness (as in bench_sft.py):
- each side runs in its own fresh process (`rlhf dpo ...` and `_trl_dpo_runner.py`), with the same
  number of torch threads;
- our side reads the HH transcripts and parses them itself (rlhf_cli/data/preference.py, template
  `plain`); trl gets, per pair, the prompt and both answers as the texts our tool's tokens spell
  (the byte tokenizer round-trips them exactly), in our tool's batch order, with a sequential
  sampler;
- the token ids and loss positions are checked sequence by sequence and the token counts batch by
  batch; the one difference is in answers cut at max_length, whose last kept token ours replaces by
  the EOS (trained) where trl keeps the answer's token (trained): same lengths, same counts;
- only the pairs our tool keeps unchanged in number are used (a prompt that leaves room for an
  answer token and the EOS, answers that differ after cutting), exactly steps x batch pairs, each
  used once, so both sides precompute (with `--precompute-ref`) the same pairs.

Time and memory are measured as in bench_sft.py: the bench's clock on the "step N/TOTAL" lines
after `--warmup-steps` untimed steps, each side's own clock as a cross-check, best of `--repeats`,
peak RSS (`ru_maxrss` from wait4) of each process.
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
    has_special_text,
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

RUNNER = Path(__file__).resolve().parent / "_trl_dpo_runner.py"
UNLIMITED = 10**9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--model", default="small", help="built-in model size (default: %(default)s)")
    p.add_argument("--steps", type=int, default=30, help="timed optimizer steps (default: %(default)s)")
    p.add_argument("--warmup-steps", type=int, default=10,
                   help="untimed steps before them; a multiple of --log-every (default: %(default)s)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--batch-size", type=int, default=8, help="pairs per step (default: %(default)s)")
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precompute-ref", action="store_true",
                   help="both sides: reference log-probs computed once before training")
    p.add_argument("--trl-first", action="store_true", help="start with trl instead of our tool")
    args = p.parse_args(argv)
    check_window(args, p)
    args.lora_dropout = 0.0
    return args


# --------------------------------------------------------------------------------------------- data


def usable_pairs(raw: list[dict], tokenizer, max_length: int, limit: int):
    """(HH rows for ours, prompt/chosen/rejected texts for trl, counts of what was left out)."""
    from rlhf_cli.data.preference import to_preference, tokenize_pair

    rows, texts, skipped = [], [], {}

    def skip(why: str) -> None:
        skipped[why] = skipped.get(why, 0) + 1

    for i, item in enumerate(raw):
        if has_special_text(str(item.get("chosen")), str(item.get("rejected"))):
            skip("special-token text in the data")
            continue
        pair = to_preference(item, f"row {i + 1}")
        if not isinstance(pair, tuple):
            skip(pair.value)
            continue
        fitted = tokenize_pair(*pair, tokenizer, "plain", max_length)
        if not isinstance(fitted, dict):
            skip(fitted.value)
            continue
        # trl gets the whole texts and cuts them at max_length itself
        full = tokenize_pair(*pair, tokenizer, "plain", UNLIMITED)
        prompt_len = next(i for i, t in enumerate(full["chosen_labels"]) if t != -100)
        decode = lambda ids: tokenizer.decode(ids, skip_special_tokens=False)  # noqa: E731
        text = {"prompt": decode(full["chosen_input_ids"][1:prompt_len]),  # trl adds the BOS
                "chosen": decode(full["chosen_input_ids"][prompt_len:-1]),  # and the EOS
                "rejected": decode(full["rejected_input_ids"][prompt_len:-1])}
        if (tokenizer(text["prompt"] + text["chosen"] + tokenizer.eos_token)["input_ids"]
                != full["chosen_input_ids"]):
            skip("texts do not round-trip")
            continue
        rows.append({"chosen": item["chosen"], "rejected": item["rejected"]})
        texts.append(text)
        if len(rows) == limit:
            break
    return rows, texts, skipped


@dataclass
class Plan:
    """What both sides train on: our tokenization, batch order and per-step token counts."""

    examples: list[dict]  # per pair: chosen then rejected, {input_ids, labels} as our tool has them
    order: list[int]  # pair index of every example, batch after batch
    batches: list[dict] = field(default_factory=list)  # per step: trained / input / padded tokens
    truncated: dict = field(default_factory=dict)


def make_plan(rows: list[dict], tokenizer, args, total_steps: int) -> Plan:
    """Tokenize with our tool's own code and take its batch order, so the timing can be checked."""
    from rlhf_cli.data.collate import pad_pairs
    from rlhf_cli.data.preference import build_preference_dataset
    from rlhf_cli.engine.batching import GlobalBatches

    pairs, report = build_preference_dataset(rows, tokenizer, "plain", args.max_length, None, source="bench")
    if report.kept != len(rows):
        raise SystemExit(f"our tool would drop rows ({report.summary()}); the plan assumes none")
    batches = GlobalBatches(len(pairs), args.batch_size, 1, 1, 0, args.seed)
    plan = Plan(examples=[{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]}
                          for p in pairs for side in ("chosen", "rejected")],
                order=[], truncated=dict(report.truncated))
    for step in range(total_steps):
        (idx,) = batches.micro_batches(step)
        batch = pad_pairs([pairs[i] for i in idx], pad_token_id=tokenizer.pad_token_id)
        plan.order += idx
        plan.batches.append({"trained_tokens": int((batch["labels"][:, 1:] != -100).sum()),
                             "input_tokens": int(batch["attention_mask"].sum()),
                             "padded_tokens": int(batch["input_ids"].numel())})
    return plan


def our_recipe(args, train_file: Path, total_steps: int) -> str:
    return f"""stage: dpo
model:
  base: builtin:{args.model}
  dtype: fp32
  lora: {{r: {args.lora_r}, alpha: {args.lora_alpha}, dropout: {args.lora_dropout}, target_modules: auto}}
data:
  train: {json.dumps(str(train_file))}
  template: plain
  max_length: {args.max_length}
dpo:
  beta: {args.beta}
  loss_type: sigmoid
  precompute_ref: {str(args.precompute_ref).lower()}
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


def ours_argv(recipe: Path, work: Path, run: int) -> list[str]:
    return [rlhf_command(), "dpo", "--recipe", str(recipe), "-o", str(work / f"ours-run{run}"), "--overwrite"]


def run_ours(args, work: Path, recipe: Path, run: int) -> dict:
    log = work / f"ours-run{run}.log"
    markers = [OURS_BEGIN, *step_markers(args.warmup_steps, args.steps, OURS_BEGIN)]
    measured = run_measured(ours_argv(recipe, work, run), child_env(args.threads, work), markers, log)
    if measured.returncode != 0:
        fail("our", measured, log)
    metrics = read_metrics(work / f"ours-run{run}" / "metrics.jsonl")
    train_rows = [m for m in metrics if m.get("split") != "eval" and "pairs_per_sec" in m]
    total = args.warmup_steps + args.steps
    return {
        "measured": measured,
        **timings(measured, args.warmup_steps, args.steps, OURS_BEGIN),
        # cross-check from the tool's own metric: pairs_per_sec of each log window
        "steady_s_in_process": in_process_seconds(train_rows, "pairs_per_sec", [args.batch_size] * total,
                                                  args.warmup_steps),
        "final_loss": train_rows[-1]["loss"],
        "first_loss": train_rows[0]["loss"],
        "final_metrics": {k: v for k, v in train_rows[-1].items() if "/" in k},
        "rss_before_train": measured.marks.get(OURS_BEGIN, (0, 0, 0))[2],
        "kept_line": next((line.strip() for line in measured.output.splitlines()
                           if "data.train:" in line), ""),
    }


def trl_argv(args, work: Path, data: Path, run: int) -> list[str]:
    argv = [sys.executable, str(RUNNER), "--model", args.model_dir, "--data", str(data),
            "--output-dir", str(work / f"trl-run{run}"), "--report", str(work / f"trl-run{run}.json"),
            "--max-steps", str(args.warmup_steps + args.steps), "--batch-size", str(args.batch_size),
            "--max-length", str(args.max_length), "--lr", str(args.lr), "--lora-r", str(args.lora_r),
            "--lora-alpha", str(args.lora_alpha), "--lora-dropout", str(args.lora_dropout),
            "--log-every", str(args.log_every), "--seed", str(args.seed), "--threads", str(args.threads),
            "--beta", str(args.beta)]
    return argv + (["--precompute-ref"] if args.precompute_ref else [])


def run_trl(args, work: Path, data: Path, run: int) -> dict:
    log = work / f"trl-run{run}.log"
    markers = [TRL_BEGIN, *step_markers(args.warmup_steps, args.steps, TRL_BEGIN)]
    measured = run_measured(trl_argv(args, work, data, run), child_env(args.threads, work), markers, log)
    if measured.returncode != 0:
        fail("trl", measured, log)
    report = json.loads((work / f"trl-run{run}.json").read_text())
    total = args.warmup_steps + args.steps
    times = [0.0, *report["step_times"]]  # seconds after on_train_begin, at the end of each step
    logs = [row for row in report["logs"] if "loss" in row]
    return {
        "measured": measured,
        **timings(measured, args.warmup_steps, args.steps, TRL_BEGIN),
        "steady_s_in_process": times[total] - times[args.warmup_steps],
        "final_loss": logs[-1]["loss"] if logs else None,
        "first_loss": logs[0]["loss"] if logs else None,
        "final_metrics": {k: v for k, v in logs[-1].items() if k.startswith(("rewards/", "logps/"))}
        if logs else {},
        "rss_before_train": report["rss_before_train"],
        "batches": report["batches"],
        "examples": report["examples"],
        "threads": report["threads"],
        "trainable_params": report["trainable_params"],
        "rows_prepared": report["rows_prepared"],
    }


# ---------------------------------------------------------------------------------------- reporting

ROWS = [
    ("steps/s (timed steps)", "steps_per_sec", "{:.3f}"),
    ("s per step", "sec_per_step", "{:.3f}"),
    ("trained tokens/s (chosen + rejected)", "trained_tokens_per_sec", "{:.0f}"),
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
    ("mean loss, first logged window", "first_loss", "{:.4f}"),
    ("mean loss, last logged window", "final_loss", "{:.4f}"),
]
RATIO_KEYS = ("steps_per_sec", "sec_per_step", "trained_tokens_per_sec", "input_tokens_per_sec", "steady_s",
              "steady_cpu_s", "loop_s", "process_wall_s", "process_cpu_s", "peak_rss_mib",
              "rss_before_train_mib", "train_rss_growth_mib")


def print_table(result: dict) -> None:
    from rich.console import Console

    ours, trl, ratio = result["ours"], result["trl"], result["ratio_ours_over_trl"]
    s = result["setup"]
    reference = "precomputed" if s["precompute_ref"] else "adapter disabled, every step"
    print_rows(f"DPO + LoRA, builtin:{s['model']} ({s['params'] / 1e6:.1f}M params, vocab {s['vocab']}), "
               f"{s['batch_size']} pairs/step, max_length {s['max_length']}, reference {reference}, "
               f"{s['threads']} threads, {s['timed_steps']} timed steps after {s['warmup_steps']}, "
               f"best of {s['repeats']} run(s) per side",
               ["metric", "ours", "trl DPOTrainer", "ours / trl"], compare_rows(ROWS, [ours, trl], ratio))
    console = Console()
    console.print(f"tokens: {s['token_check']}")
    console.print(f"clocks: {s['clock_check']}")
    console.print(f"speed-up ours vs trl: {ratio['steps_per_sec']:.2f}x (goal >= 1.5); peak memory ours/trl: "
                  f"{ratio['peak_rss_mib']:.2f} (goal <= 1)")
    if s["contended"]:
        console.print(f"[bold yellow]warning:[/] {s['contended']}")


def token_check(plan: Plan, trl: dict, args, eos_id: int) -> tuple[list[str], str]:
    ours_examples = [plan.examples[2 * i + k] for i in plan.order for k in (0, 1)]
    problems, counts = compare_examples(ours_examples, trl["examples"], eos_id)
    total = args.warmup_steps + args.steps
    problems += compare_batches(plan.batches, trl["batches"], total)
    timed = plan.batches[args.warmup_steps:total]
    if problems:
        return problems, "MISMATCH: " + "; ".join(problems)
    return problems, (
        f"same batches on both sides: {len(plan.order)} pairs ({len(ours_examples)} sequences), "
        f"{sum(b['trained_tokens'] for b in timed)} trained / {sum(b['input_tokens'] for b in timed)} "
        f"input / {sum(b['padded_tokens'] for b in timed)} padded tokens in the timed steps; "
        f"{counts['same']} sequences with identical ids and loss positions, {counts['last']} cut at "
        "max_length that differ only in the last token (ours: EOS, trl: the cut answer's next token)")


def main(argv=None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(ROOT))
    from rlhf_cli.builtin.model import build_config as builtin_config
    from rlhf_cli.builtin.model import count_params, materialize
    from rlhf_cli.models.loading import load_tokenizer

    model_dir = materialize(args.model)  # before any timing: both sides load the same directory
    args.model_dir = str(model_dir)
    tokenizer = load_tokenizer(str(model_dir))
    total_steps = args.warmup_steps + args.steps
    needed = total_steps * args.batch_size
    rows, texts, skipped = usable_pairs(read_hh(args.data), tokenizer, args.max_length, needed)
    if len(rows) < needed:
        raise SystemExit(f"only {len(rows)} usable pairs; {total_steps} steps of {args.batch_size} need "
                         f"{needed} (lower --steps or --batch-size)")
    plan = make_plan(rows, tokenizer, args, total_steps)

    work = make_work_dir(args.keep, "rlhf-bench-dpo-")
    try:
        ours_data, trl_data, recipe = work / "pairs.jsonl", work / "pairs-trl.jsonl", work / "recipe.yaml"
        write_jsonl(ours_data, rows)
        write_jsonl(trl_data, [texts[i] for i in plan.order])  # trl: in our batch order
        recipe.write_text(our_recipe(args, ours_data, total_steps), encoding="utf-8")
        print(f"data: {len(rows)} pairs from {args.data} (left out before the first {len(rows)} usable: "
              + (", ".join(f"{n} {why}" for why, n in skipped.items()) or "none")
              + f"); cut at max_length: {plan.truncated or 'none'}; {total_steps} steps x {args.batch_size} "
              f"pairs; reference {'precomputed' if args.precompute_ref else 'adapter disabled'}; "
              f"work dir {work}", flush=True)
        if args.dry_run:
            print("ours:", " ".join(ours_argv(recipe, work, 0)))
            print("trl: ", " ".join(trl_argv(args, work, trl_data, 0)))
            return 0

        sides = ["trl", "ours"] if args.trl_first else ["ours", "trl"]
        runs = alternate(sides, args.repeats, lambda side, run: run_ours(args, work, recipe, run)
                         if side == "ours" else run_trl(args, work, trl_data, run))
        problems, check = token_check(plan, runs["trl"][0], args, tokenizer.eos_token_id)
        timed = plan.batches[args.warmup_steps:total_steps]
        ours, trl = (summarize_steps(runs[side], timed, args.steps) for side in ("ours", "trl"))
        for side, name in ((ours, "ours"), (trl, "trl")):
            side["train_rss_growth_mib"] = side["peak_rss_mib"] - side["rss_before_train_mib"]
            side["first_loss"] = runs[name][-1]["first_loss"]
            side["final_metrics"] = runs[name][-1]["final_metrics"]
        config = builtin_config(args.model)
        ratio = ratios(ours, trl, RATIO_KEYS)
        result = {
            **header("dpo-lora"),
            "setup": {
                "model": args.model, "params": count_params(args.model), "vocab": config.vocab_size,
                "batch_size": args.batch_size, "max_length": args.max_length, "threads": args.threads,
                "timed_steps": args.steps, "warmup_steps": args.warmup_steps, "repeats": args.repeats,
                "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": args.lora_dropout,
                         "target_modules": "all-linear"},
                "loss": "sigmoid", "beta": args.beta, "precompute_ref": args.precompute_ref,
                "lr": args.lr, "seed": args.seed, "pairs": len(rows), "rows_left_out": skipped,
                "cut_at_max_length": plan.truncated, "token_check": check,
                "clock_check": clock_check({"ours": ours, "trl": trl}),
                "contended": contention({"ours": ours, "trl": trl}, args.threads),
                "trl_threads": runs["trl"][0]["threads"],
                "trl_trainable_params": runs["trl"][0]["trainable_params"],
                "ours_data_line": runs["ours"][0]["kept_line"],
            },
            "ours": ours,
            "trl": trl,
            "ratio_ours_over_trl": ratio,
            "goal": {"speed_ratio_at_least": 1.5, "memory_ratio_at_most": 1.0,
                     "met": ratio["steps_per_sec"] >= 1.5 and ratio["peak_rss_mib"] <= 1.0},
        }
        print_table(result)
        write_json(result, args.json_out)
        return 1 if problems else 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
