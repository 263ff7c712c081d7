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
import sys
from pathlib import Path

import _vs_trl as vs
from _common import add_common_args, add_lora_args, read_hh, work_dir, write_jsonl
from _report import write_json

RUNNER = Path(__file__).resolve().parent / "_trl_sft_runner.py"
ASSISTANT = "\n\nAssistant:"


# ---------------------------------------------------------------------------------------- arguments


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--rows", type=int, default=2000,
                   help="at most this many usable rows (default: %(default)s)")
    vs.add_run_args(p, lr=2e-4)
    add_lora_args(p, dropout=0.05)
    p.add_argument("--seed", type=int, default=42)
    return vs.parse_run_args(p, argv)


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


def make_plan(rows: list[dict], tokenizer, args, total_steps: int) -> vs.Plan:
    """Tokenize with our tool's own code and take its batch order, so the timing can be checked."""
    from rlhf_cli.data.collate import pad_batch
    from rlhf_cli.data.sft import build_sft_dataset
    from rlhf_cli.stages.sft import trained_tokens

    examples, report = build_sft_dataset(rows, tokenizer, "plain", args.max_length, None, source="bench")
    return vs.plan_batches(examples, report, len(rows),
                           [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples],
                           report.truncated.get("response", 0), args, total_steps,
                           lambda items: pad_batch(items, pad_token_id=tokenizer.pad_token_id),
                           trained_tokens)


def our_recipe(args, train_file: Path, total_steps: int) -> str:
    return vs.lora_recipe(args, "sft", train_file, total_steps, data="  format: prompt_response\n",
                          section="sft:\n  completion_only: true\n")


# ------------------------------------------------------------------------------------------ running


def run_ours(args, plan: vs.Plan, work: Path, recipe: Path, run: int) -> dict:
    # tokens_per_sec is the trained tokens of the log window over the seconds its training steps
    # took; the plan knows each step's trained tokens.
    result, _ = vs.run_ours(args, "sft", work, recipe, run, "tokens_per_sec",
                            [b["trained_tokens"] for b in plan.batches])
    # ours: the plan's batches (computed with the tool's own tokenizer, template and batcher)
    return {**result, "batches": None, "examples": None}


def trl_argv(args, work: Path, data: Path, run: int) -> list[str]:
    return vs.trl_argv(args, RUNNER, work, data, run)


def run_trl(args, work: Path, data: Path, run: int) -> dict:
    result, _, _ = vs.run_trl(args, trl_argv(args, work, data, run), work, run)
    return result


# ----------------------------------------------------------------------------------------- checking


def check_tokens(plan: vs.Plan, trl: dict, args, eos_id: int) -> tuple[list[str], str]:
    """Differences between what the two sides trained on (none when the tokens match) and the check."""
    return vs.token_check(plan, [plan.examples[i] for i in plan.order], trl, args, eos_id,
                          counted=f"{len(plan.order)} examples", unit="examples", loss="labels",
                          cut="response")


# ---------------------------------------------------------------------------------------- reporting

ROWS = vs.table_rows(("steps_per_sec", "trained_tokens_per_sec", "input_tokens_per_sec", "steady_s",
                      "steady_cpu_s", "cpu_utilisation", "loop_s", "process_wall_s", "process_cpu_s",
                      "peak_rss_mib", "rss_before_train_mib", "train_rss_growth_mib", "final_loss"))
RATIO_KEYS = ("steps_per_sec", "trained_tokens_per_sec", "input_tokens_per_sec", "steady_s", "steady_cpu_s",
              "loop_s", "process_wall_s", "process_cpu_s", "peak_rss_mib", "rss_before_train_mib",
              "train_rss_growth_mib")


def print_table(result: dict) -> None:
    s = result["setup"]
    vs.print_result(result, "SFT", f"batch {s['batch_size']}, max_length {s['max_length']}",
                    "trl SFTTrainer", ROWS)


def main(argv=None) -> int:
    args = parse_args(argv)
    tokenizer = vs.load_model(args)
    rows, skipped = usable_rows(read_hh(args.data), tokenizer, args.max_length, args.rows)
    total_steps = args.warmup_steps + args.steps
    vs.check_enough(len(rows), args, "rows")
    plan = make_plan(rows, tokenizer, args, total_steps)

    with work_dir(args.keep, "rlhf-bench-sft-") as work:
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
        runs = vs.run_sides(args, vs.ours_argv("sft", recipe, work, 0), trl_argv(args, work, trl_data, 0),
                            lambda run: run_ours(args, plan, work, recipe, run),
                            lambda run: run_trl(args, work, trl_data, run))
        if runs is None:
            return 0

        problems, check = check_tokens(plan, runs["trl"][0], args, tokenizer.eos_token_id)
        ours, trl = vs.summarize_sides(runs, plan, args)
        result = vs.result("sft-lora", args, {
            "lr": args.lr, "seed": args.seed, "rows": len(rows), "rows_left_out": skipped,
            "responses_truncated": plan.truncated,
        }, check, runs, ours, trl, RATIO_KEYS)
        print_table(result)
        write_json(result, args.json_out)
        return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
