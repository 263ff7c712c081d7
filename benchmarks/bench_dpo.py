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
import sys
from pathlib import Path

import _vs_trl as vs
from _common import add_common_args, add_lora_args, has_special_text, read_hh, work_dir, write_jsonl
from _report import write_json

RUNNER = Path(__file__).resolve().parent / "_trl_dpo_runner.py"
UNLIMITED = 10**9


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    vs.add_run_args(p, lr=1e-4, batch_help="pairs per step (default: %(default)s)")
    p.add_argument("--beta", type=float, default=0.1)
    add_lora_args(p)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--precompute-ref", action="store_true",
                   help="both sides: reference log-probs computed once before training")
    args = vs.parse_run_args(p, argv)
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
        pair = to_preference(item, f"row {i + 1}", keep_text=True)  # as `plain` reads HH rows
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


def make_plan(rows: list[dict], tokenizer, args, total_steps: int) -> vs.Plan:
    """Tokenize with our tool's own code and take its batch order, so the timing can be checked."""
    from rlhf_cli.data.collate import pad_pairs
    from rlhf_cli.data.preference import build_preference_dataset

    pairs, report = build_preference_dataset(rows, tokenizer, "plain", args.max_length, None, source="bench")
    # per pair: chosen then rejected
    examples = [{"input_ids": p[f"{side}_input_ids"], "labels": p[f"{side}_labels"]}
                for p in pairs for side in ("chosen", "rejected")]
    return vs.plan_batches(pairs, report, len(rows), examples, dict(report.truncated), args, total_steps,
                           lambda items: pad_pairs(items, pad_token_id=tokenizer.pad_token_id),
                           lambda batch: int((batch["labels"][:, 1:] != -100).sum()))


def our_recipe(args, train_file: Path, total_steps: int) -> str:
    return vs.lora_recipe(args, "dpo", train_file, total_steps, data="", section=f"""dpo:
  beta: {args.beta}
  loss_type: sigmoid
  precompute_ref: {str(args.precompute_ref).lower()}
""")


# ------------------------------------------------------------------------------------------ running


def run_ours(args, work: Path, recipe: Path, run: int) -> dict:
    # cross-check from the tool's own metric: pairs_per_sec of each log window
    total = args.warmup_steps + args.steps
    result, train_rows = vs.run_ours(args, "dpo", work, recipe, run, "pairs_per_sec",
                                     [args.batch_size] * total)
    return {**result, "first_loss": train_rows[0]["loss"],
            "final_metrics": {k: v for k, v in train_rows[-1].items() if "/" in k}}


def trl_argv(args, work: Path, data: Path, run: int) -> list[str]:
    argv = vs.trl_argv(args, RUNNER, work, data, run) + ["--beta", str(args.beta)]
    return argv + (["--precompute-ref"] if args.precompute_ref else [])


def run_trl(args, work: Path, data: Path, run: int) -> dict:
    result, report, logs = vs.run_trl(args, trl_argv(args, work, data, run), work, run)
    return {
        **result,
        "first_loss": logs[0]["loss"] if logs else None,
        "final_metrics": {k: v for k, v in logs[-1].items() if k.startswith(("rewards/", "logps/"))}
        if logs else {},
        "rows_prepared": report["rows_prepared"],
    }


# ---------------------------------------------------------------------------------------- reporting

ROWS = vs.table_rows(("steps_per_sec", "sec_per_step", "trained_tokens_per_sec", "input_tokens_per_sec",
                      "steady_s", "steady_cpu_s", "cpu_utilisation", "loop_s", "process_wall_s",
                      "process_cpu_s", "peak_rss_mib", "rss_before_train_mib", "train_rss_growth_mib",
                      "first_loss", "final_loss"),
                     labels={"trained_tokens_per_sec": "trained tokens/s (chosen + rejected)"},
                     formats={"first_loss": "{:.4f}", "final_loss": "{:.4f}"})
RATIO_KEYS = ("steps_per_sec", "sec_per_step", "trained_tokens_per_sec", "input_tokens_per_sec", "steady_s",
              "steady_cpu_s", "loop_s", "process_wall_s", "process_cpu_s", "peak_rss_mib",
              "rss_before_train_mib", "train_rss_growth_mib")


def print_table(result: dict) -> None:
    s = result["setup"]
    reference = "precomputed" if s["precompute_ref"] else "adapter disabled, every step"
    vs.print_result(result, "DPO", f"{s['batch_size']} pairs/step, max_length {s['max_length']}, "
                    f"reference {reference}", "trl DPOTrainer", ROWS,
                    speed_goal=" (goal >= 1.5)", memory_goal=" (goal <= 1)")


def token_check(plan: vs.Plan, trl: dict, args, eos_id: int) -> tuple[list[str], str]:
    ours_examples = [plan.examples[2 * i + k] for i in plan.order for k in (0, 1)]
    return vs.token_check(plan, ours_examples, trl, args, eos_id,
                          counted=f"{len(plan.order)} pairs ({len(ours_examples)} sequences)",
                          unit="sequences", loss="loss positions", cut="answer")


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer = vs.load_model(args)
    total_steps = args.warmup_steps + args.steps
    needed = total_steps * args.batch_size
    rows, texts, skipped = usable_pairs(read_hh(args.data), tokenizer, args.max_length, needed)
    vs.check_enough(len(rows), args, "pairs")
    plan = make_plan(rows, tokenizer, args, total_steps)

    with work_dir(args.keep, "rlhf-bench-dpo-") as work:
        ours_data, trl_data, recipe = work / "pairs.jsonl", work / "pairs-trl.jsonl", work / "recipe.yaml"
        write_jsonl(ours_data, rows)
        write_jsonl(trl_data, [texts[i] for i in plan.order])  # trl: in our batch order
        recipe.write_text(our_recipe(args, ours_data, total_steps), encoding="utf-8")
        print(f"data: {len(rows)} pairs from {args.data} (left out before the first {len(rows)} usable: "
              + (", ".join(f"{n} {why}" for why, n in skipped.items()) or "none")
              + f"); cut at max_length: {plan.truncated or 'none'}; {total_steps} steps x {args.batch_size} "
              f"pairs; reference {'precomputed' if args.precompute_ref else 'adapter disabled'}; "
              f"work dir {work}", flush=True)
        runs = vs.run_sides(args, vs.ours_argv("dpo", recipe, work, 0), trl_argv(args, work, trl_data, 0),
                            lambda run: run_ours(args, work, recipe, run),
                            lambda run: run_trl(args, work, trl_data, run))
        if runs is None:
            return 0

        problems, check = token_check(plan, runs["trl"][0], args, tokenizer.eos_token_id)
        ours, trl = vs.summarize_sides(runs, plan, args)
        for side, name in ((ours, "ours"), (trl, "trl")):
            side["first_loss"] = runs[name][-1]["first_loss"]
            side["final_metrics"] = runs[name][-1]["final_metrics"]
        result = vs.result("dpo-lora", args, {
            "loss": "sigmoid", "beta": args.beta, "precompute_ref": args.precompute_ref,
            "lr": args.lr, "seed": args.seed, "pairs": len(rows), "rows_left_out": skipped,
            "cut_at_max_length": plan.truncated,
        }, check, runs, ours, trl, RATIO_KEYS)
        ratio = result["ratio_ours_over_trl"]
        result["goal"] = {"speed_ratio_at_least": 1.5, "memory_ratio_at_most": 1.0,
                          "met": ratio["steps_per_sec"] >= 1.5 and ratio["peak_rss_mib"] <= 1.0}
        print_table(result)
        write_json(result, args.json_out)
        return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
