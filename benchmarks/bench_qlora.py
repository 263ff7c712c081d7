"""QLoRA against a bf16 base: PPO `1base-1lora` with `model.quantization: 4bit` and without.

    .venv/bin/python benchmarks/bench_qlora.py [--iterations 3] [--repeats N] [--json-out FILE]

Both sides run bench_ppo.py's PPO run (same HH prompts, reward model, sizes, seed and LoRA) on
`builtin:large` (374M, 32000-entry vocabulary) in `model.dtype: bf16`; one side loads the base in
nf4 with double quantization (computing in bf16). The reward model is one LoRA RM run on the
unquantized bf16 base, made first or given with `--reward-model` (the 4-bit side puts that
adapter on its 4-bit body). Run it with the repository first on PYTHONPATH when the installed
`rlhf` is another checkout.

Per side: the time per PPO iteration after `--warmup-iterations` untimed ones (as metrics.jsonl
splits it), the process's peak RSS (ru_maxrss, loading included) and the largest RSS sampled
during the timed iterations. Then, each in a fresh child, the bytes of the loaded base's weights
(`state_dict()`: packed 4-bit weights with their quantization constants), split into what
bitsandbytes quantizes (the transformer blocks' linears) and what stays in bf16 (embeddings, LM
head, norms). Goal: 4-bit weights <= 0.45x the bf16 bytes, and peak RSS lower by at least the
bytes saved.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
from pathlib import Path

import bench_ppo
from _common import ROOT, child_env, make_work_dir, median, read_hh, write_jsonl
from _ppo_report import summarize
from _report import header, loadavg, print_rows, write_json

SIDES = {"bf16": None, "4bit": "4bit"}  # side -> model.quantization
ARRANGEMENT = "1base-1lora"
WEIGHT_BYTES_GOAL = 0.45


def parse_args(argv=None) -> argparse.Namespace:
    p = bench_ppo.build_parser(__doc__)
    p.add_argument("--weight-bytes", choices=tuple(SIDES), help=argparse.SUPPRESS)  # internal: in a child
    # Small rollouts: a 374M model on a shared CPU; both sides do the same work.
    p.set_defaults(model="large", dtype="bf16", iterations=3, warmup_iterations=1, rollout_batch_size=4,
                   mini_batch_size=4, ppo_epochs=1, max_new_tokens=16, max_length=96, rm_steps=2)
    return bench_ppo.parse_args(argv, p)


def weight_bytes(model: str, dtype: str, quantization: str | None) -> dict:
    """Bytes of the loaded base's weights, as `state_dict()` holds them (this process)."""
    sys.path.insert(0, str(ROOT))
    from rlhf_cli.models.loading import load_causal_lm
    from rlhf_cli.schema import ModelSection

    lm = load_causal_lm(ModelSection(base=f"builtin:{model}", dtype=dtype, quantization=quantization))
    tensors = lm.state_dict()
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    in_blocks = sum(t.numel() * t.element_size() for name, t in tensors.items() if ".layers." in name)
    return {"weight_bytes": total, "block_bytes": in_blocks, "outside_blocks_bytes": total - in_blocks,
            "embedding_and_head_bytes": sum(t.numel() * t.element_size() for name, t in tensors.items()
                                            if "embed_tokens" in name or "lm_head" in name)}


def weight_bytes_in_child(args, work: Path, side: str) -> dict:
    argv = [sys.executable, str(Path(__file__).resolve()), "--weight-bytes", side, "--model", args.model,
            "--dtype", args.dtype]
    proc = subprocess.run(argv, env=child_env(args.threads, work), cwd=ROOT, capture_output=True, text=True)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        raise SystemExit(f"counting the {side} weights failed:\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1])


def side_recipe(args, side: str, prompts: Path, rm_dir: Path) -> str:
    """bench_ppo's PPO recipe with this side's model.quantization."""
    side_args = argparse.Namespace(**{**vars(args), "quantization": SIDES[side]})
    return bench_ppo.ppo_recipe(side_args, ARRANGEMENT, prompts, rm_dir)


def prepare(args, work: Path) -> dict[str, Path]:
    """The prompts file and one recipe per side (bench_ppo's, with model.quantization set)."""
    from rlhf_cli.builtin.model import materialize
    from rlhf_cli.models.loading import load_tokenizer

    tokenizer = load_tokenizer(str(materialize(args.model)))  # before any timing
    needed, limit = args.iterations * args.rollout_batch_size, args.max_length - args.max_new_tokens
    rows, _ = bench_ppo.usable_prompts(read_hh(args.data), tokenizer, limit, needed)
    if len(rows) < needed:
        raise SystemExit(f"only {len(rows)} prompts fit {limit} tokens; {needed} are needed")
    prompts = work / "prompts.jsonl"
    write_jsonl(prompts, rows)
    recipes = {}
    for side in SIDES:
        recipes[side] = work / f"ppo-{side}.yaml"
        recipes[side].write_text(side_recipe(args, side, prompts, args.reward_model or work / "rm"),
                                 encoding="utf-8")
    return recipes


def compare(per: dict, weights: dict) -> dict:
    four, bf16 = per["4bit"], per["bf16"]
    saved_mib = (weights["bf16"]["weight_bytes"] - weights["4bit"]["weight_bytes"]) / 2**20
    ratio = weights["4bit"]["weight_bytes"] / weights["bf16"]["weight_bytes"]
    drop = {k: bf16[k] - four[k] for k in ("peak_rss_mib", "timed_iterations_peak_rss_mib")}
    return {
        "weight_bytes_ratio": ratio, "weight_mib_saved": saved_mib, "peak_rss_drop_mib": drop,
        "time_iteration_ratio": four["time_iteration"] / bf16["time_iteration"],
        "goal": {"weight_bytes_ratio_at_most": WEIGHT_BYTES_GOAL, "weights_met": ratio <= WEIGHT_BYTES_GOAL,
                 "peak_rss_drop_at_least_mib": saved_mib,
                 "memory_met": drop["peak_rss_mib"] >= saved_mib},
    }


def print_result(per: dict, weights: dict, comparison: dict) -> None:
    mib = 2**20
    rows = [(label, *(fmt.format(source[side][key] / scale) for side in SIDES))
            for label, source, key, fmt, scale in (
                ("s / iteration", per, "time_iteration", "{:.2f}", 1),
                ("peak RSS, whole process (MiB)", per, "peak_rss_mib", "{:.0f}", 1),
                ("peak RSS, timed iterations (MiB)", per, "timed_iterations_peak_rss_mib", "{:.0f}", 1),
                ("base weights (MiB)", weights, "weight_bytes", "{:.1f}", mib),
                ("  in transformer blocks (MiB)", weights, "block_bytes", "{:.1f}", mib),
                ("  embeddings + LM head (MiB)", weights, "embedding_and_head_bytes", "{:.1f}", mib))]
    print_rows(f"PPO {ARRANGEMENT}: bf16 base vs 4-bit (nf4) base", ["", *SIDES], rows)
    print(json.dumps(comparison, indent=1))


def run_sides(args, work: Path, recipes: dict[str, Path]) -> dict[str, list[dict]]:
    runs: dict[str, list[dict]] = {side: [] for side in SIDES}
    for run in range(args.repeats):
        for side in SIDES:  # alternating, so that a change in the machine's load hits both
            load = loadavg()
            print(f"run {run + 1}/{args.repeats}: {side} (load average {load:.2f}) ...", flush=True)
            result = bench_ppo.run_arrangement(args, work, side, recipes[side], run)
            result["loadavg_before"] = load
            runs[side].append(result)
            print(f"  {result['time_iteration']:.2f} s/iteration, peak RSS "
                  f"{result['measured'].peak_rss / 2**20:.0f} MiB", flush=True)
    return runs


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.weight_bytes is not None:
        print(json.dumps(weight_bytes(args.model, args.dtype, SIDES[args.weight_bytes])))
        return 0
    sys.path.insert(0, str(ROOT))
    work = make_work_dir(args.keep, "rlhf-bench-qlora-")
    try:
        recipes = prepare(args, work)
        if args.dry_run:
            for side, recipe in recipes.items():
                print(f"{side}:", " ".join(bench_ppo.ppo_argv(recipe, work / f"{side}-run0")))
            return 0
        if args.reward_model:
            rm_info = {"given": str(args.reward_model)}
        else:
            print(f"reward model: {args.rm_steps} steps of `rlhf rm` on builtin:{args.model} "
                  f"({args.dtype}) ...", flush=True)
            _, rm_info = bench_ppo.train_rm(args, work)  # into work/rm, which the recipes name
        load_before = loadavg()
        per = {side: summarize(runs) for side, runs in run_sides(args, work, recipes).items()}
        weights = {side: weight_bytes_in_child(args, work, side) for side in SIDES}
        comparison = compare(per, weights)
        result = {**header("qlora-ppo"), "setup": {
            "model": args.model, "dtype": args.dtype, "arrangement": ARRANGEMENT, "threads": args.threads,
            "rollout_batch_size": args.rollout_batch_size, "mini_batch_size": args.mini_batch_size,
            "ppo_epochs": args.ppo_epochs, "max_new_tokens": args.max_new_tokens,
            "max_length": args.max_length,
            "iterations": args.iterations, "warmup_iterations": args.warmup_iterations,
            "repeats": args.repeats, "lora": {"r": args.lora_r, "alpha": args.lora_alpha},
            "reward_model": rm_info, "loadavg_before": load_before, "loadavg_after": loadavg(),
            "loadavg_median": median([r["loadavg_before"] for side in per.values() for r in side["runs"]])},
            "sides": per, "weights": weights, "comparison": comparison}
        print_result(per, weights, comparison)
        write_json(result, args.json_out)
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
