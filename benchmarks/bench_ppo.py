"""PPO arrangements side by side: `rlhf ppo` with `separate`, `2base-2lora`, `1base-2lora` and
`1base-1lora` on the same base, reward model, prompts and sizes.

    .venv/bin/python benchmarks/bench_ppo.py [--iterations 4] [--repeats N] [--json-out FILE]

Every arrangement trains `builtin:base` (a 106M-parameter LLaMA with a 32000-entry vocabulary, fp32,
CPU) with LoRA r=16, alpha=32, dropout 0, on the same prompts (Anthropic HH-RLHF harmless dialogues
that fit `--max-length` minus `--max-new-tokens`), with the same rollout batch, minibatch, PPO
epochs, max_new_tokens, learning rate and seed. The reward comes from one reward model for all
four: a LoRA RM run made first with `rlhf rm` on the same base (a few steps: its quality does not
matter here, only that every arrangement scores with it and starts its critic from it), or an RM
run given with `--reward-model`.

Each arrangement runs in its own fresh process, one after the other (alternating over
`--repeats`). Per arrangement the bench reports the peak RSS of the process (`ru_maxrss` from
wait4), and the time per iteration after `--warmup-iterations` untimed ones, split as PPO logs it
in metrics.jsonl: `time_generate` (sampling the rollout), `time_score` (the reward model) and
`time_train` (old/reference log-probs and values, then the PPO epochs). The fastest run of each
arrangement counts, and the largest peak RSS. Ratios are against `separate`.

The built-in base is random, so it almost never samples the EOS: every response is
`--max-new-tokens` long in every arrangement, and each iteration does the same amount of work
whatever the arrangement learnt. After the timed runs the bench builds each arrangement once in
its own process and counts what it holds: base models, parameters, trainable parameters.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from _common import (
    ROOT,
    add_common_args,
    child_env,
    contention,
    fail,
    make_work_dir,
    median,
    read_hh,
    read_metrics,
    rlhf_command,
    run_measured,
    write_jsonl,
)
from _ppo_report import ARRANGEMENTS, PHASES, goal_of, print_table, ratios_vs_separate, summarize
from _report import header, loadavg, write_json

RM_ROWS = 200
COUNTER = Path(__file__).resolve()  # `--count-held RECIPE` re-runs this file in a child


def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    """The options of this bench (bench_qlora.py takes the same and adds its own)."""
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_common_args(p)
    p.add_argument("--model", default="base", help="built-in model size (default: %(default)s)")
    p.add_argument("--arrangements", nargs="+", default=list(ARRANGEMENTS), choices=ARRANGEMENTS)
    p.add_argument("--iterations", type=int, default=4, help="PPO iterations per run (default: %(default)s)")
    p.add_argument("--warmup-iterations", type=int, default=1,
                   help="untimed iterations at the start of each run (default: %(default)s)")
    p.add_argument("--rollout-batch-size", type=int, default=16)
    p.add_argument("--mini-batch-size", type=int, default=8)
    p.add_argument("--ppo-epochs", type=int, default=2)
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--max-length", type=int, default=128,
                   help="prompt + response tokens (default: %(default)s)")
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--reward-model", type=Path, help="an `rlhf rm` run on the same base (default: train one)")
    p.add_argument("--rm-steps", type=int, default=4,
                   help="steps of the RM run made first (default: %(default)s)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="model.gradient_checkpointing in every arrangement (default: off)")
    p.add_argument("--micro-batch-size", type=int,
                   help="ppo.micro_batch_size in every arrangement (default: unset, one forward a minibatch)")
    p.add_argument("--no-count", action="store_true", help="skip counting what each arrangement holds")
    p.add_argument("--count-held", type=Path, help=argparse.SUPPRESS)  # internal: one recipe, in a child
    p.add_argument("--dtype", default="fp32", choices=("fp32", "bf16"),
                   help="model.dtype of the RM and every PPO run (default: %(default)s)")
    p.add_argument("--quantization", choices=("4bit", "8bit"),
                   help="model.quantization of every PPO run (default: none; the RM is never quantized)")
    return p


def parse_args(argv=None, p: argparse.ArgumentParser | None = None) -> argparse.Namespace:
    p = p or build_parser()
    args = p.parse_args(argv)
    if args.count_held is None and not 0 <= args.warmup_iterations < args.iterations:
        p.error("--warmup-iterations must be >= 0 and below --iterations")
    if args.repeats < 1:
        p.error("--repeats must be >= 1")
    return args


# --------------------------------------------------------------------------------------------- data


def usable_prompts(raw: list[dict], tokenizer, limit_tokens: int, needed: int) -> tuple[list[dict], int]:
    """The first `needed` HH rows whose prompt our tool keeps (BOS + rendered prompt <= limit_tokens),
    decided with the functions `rlhf ppo` reads its prompts with."""
    from rlhf_cli.data.prompt_data import to_prompt
    from rlhf_cli.data.prompts import prompt_ids_for_generation

    rows, dropped = [], 0
    for i, row in enumerate(raw):
        item = {"chosen": row["chosen"], "rejected": row["rejected"]}
        conversation = to_prompt(item, f"row {i + 1}", keep_text=True)  # as `plain` reads HH rows
        if (not isinstance(conversation, list)
                or len(prompt_ids_for_generation(conversation, tokenizer, "plain", None)) > limit_tokens):
            dropped += 1
            continue
        rows.append(item)
        if len(rows) == needed:
            break
    return rows, dropped


def lora_yaml(args) -> str:
    return f"{{r: {args.lora_r}, alpha: {args.lora_alpha}, dropout: 0.0, target_modules: auto}}"


def rm_recipe(args, pairs: Path) -> str:
    return f"""stage: rm
model:
  base: builtin:{args.model}
  dtype: {args.dtype}
  lora: {lora_yaml(args)}
data:
  train: {json.dumps(str(pairs))}
  eval: {json.dumps(str(pairs.with_name("rm-eval.jsonl")))}
  template: plain
  max_length: {args.max_length}
train:
  lr: 1.0e-4
  schedule: constant
  batch_size: 4
  max_steps: {args.rm_steps}
  eval_every: {args.rm_steps}
  seed: {args.seed}
  log_every: 1
launch:
  launcher: none
  cpu: true
"""


def ppo_recipe(args, arrangement: str, prompts: Path, rm_dir: Path) -> str:
    return f"""stage: ppo
model:
  base: builtin:{args.model}
  dtype: {args.dtype}
  quantization: {args.quantization or "null"}
  lora: {lora_yaml(args)}
  gradient_checkpointing: {str(args.gradient_checkpointing).lower()}
data:
  train: {json.dumps(str(prompts))}
  template: plain
  max_length: {args.max_length}
train:
  lr: {args.lr}
  schedule: constant
  max_steps: {args.iterations}
  seed: {args.seed}
  log_every: 1
ppo:
  arrangement: {arrangement}
  reward_model: {json.dumps(str(rm_dir))}
  reward_fn: null
  rollout_batch_size: {args.rollout_batch_size}
  mini_batch_size: {args.mini_batch_size}
  micro_batch_size: {"null" if args.micro_batch_size is None else args.micro_batch_size}
  ppo_epochs: {args.ppo_epochs}
  max_new_tokens: {args.max_new_tokens}
  temperature: 1.0
launch:
  launcher: none
  cpu: true
"""


# ------------------------------------------------------------------------------------------ running


def train_rm(args, work: Path) -> tuple[Path, dict]:
    pairs = work / "rm-pairs.jsonl"
    # A few HH rows (the RM drops those too long for max_length); held-out ones give its
    # reward_stats.json.
    rows = [{"chosen": r["chosen"], "rejected": r["rejected"]} for r in read_hh(args.data)]
    write_jsonl(pairs, rows[:RM_ROWS])
    write_jsonl(work / "rm-eval.jsonl", rows[-RM_ROWS // 2:])
    recipe = work / "rm.yaml"
    recipe.write_text(rm_recipe(args, pairs), encoding="utf-8")
    out, log = work / "rm", work / "rm.log"
    measured = run_measured([rlhf_command(), "rm", "--recipe", str(recipe), "-o", str(out), "--overwrite"],
                            child_env(args.threads, work), [], log)
    if measured.returncode != 0:
        fail("rm", measured, log)
    return out, {"wall_s": measured.wall_s, "peak_rss_mib": measured.peak_rss / 2**20,
                 "steps": args.rm_steps}


def ppo_argv(recipe: Path, out: Path) -> list[str]:
    return [rlhf_command(), "ppo", "--recipe", str(recipe), "-o", str(out), "--overwrite"]


def iteration_line(k: int, total: int) -> str:
    return f"iteration {k}/{total}  "  # PPO's progress line after iteration k (log_every 1)


def run_arrangement(args, work: Path, arrangement: str, recipe: Path, run: int) -> dict:
    out, log = work / f"{arrangement}-run{run}", work / f"{arrangement}-run{run}.log"
    lines = ["data.train:", *(iteration_line(k, args.iterations) for k in range(1, args.iterations + 1))]
    measured = run_measured(ppo_argv(recipe, out), child_env(args.threads, work), lines, log)
    if measured.returncode != 0:
        fail(arrangement, measured, log)
    rows = [m for m in read_metrics(out / "metrics.jsonl") if m.get("split") != "eval" and "time_train" in m]
    for m in rows:
        m["time_iteration"] = sum(m[k] for k in PHASES)
        end, start = lines[m["step"]], lines[m["step"] - 1]
        if start in measured.marks and end in measured.marks:  # this process's CPU over that time
            m["cpu_utilisation"] = ((measured.marks[end][1] - measured.marks[start][1])
                                    / (measured.marks[end][0] - measured.marks[start][0]))
    timed = [m for m in rows if m["step"] > args.warmup_iterations]
    first, last = lines[args.warmup_iterations], lines[-1]
    window = measured.marks[last][0] - measured.marks[first][0]
    cpu = measured.marks[last][1] - measured.marks[first][1]
    return {
        "measured": measured,
        **{k: sum(m[k] for m in timed) / len(timed) for k in (*PHASES, "time_iteration")},
        "fastest_iteration": min(m["time_iteration"] for m in timed),
        "iteration_s_by_lines": window / len(timed), "cpu_utilisation": cpu / window,
        "iterations": [{k: m[k] for k in ("step", *PHASES, "time_iteration", "cpu_utilisation", "score", "kl",
                                          "response_length") if k in m} for m in rows],
        "rss_after_warmup": measured.marks[first][2],
        "timed_peak_rss": measured.peak_between(measured.marks[first][0], measured.marks[last][0]),
    }


# ------------------------------------------------------------------------- what an arrangement holds


def count_held(recipe_path: Path) -> dict:
    """Build the arrangement of a PPO recipe as `rlhf ppo` does and count what it holds."""
    sys.path.insert(0, str(ROOT))
    import resource

    import psutil
    import torch

    from rlhf_cli.config import load_recipe
    from rlhf_cli.models.arrangement_build import build_arrangement
    from rlhf_cli.models.policy import tokenizer_for

    recipe = load_recipe(recipe_path, stage="ppo")
    arrangement = build_arrangement(recipe, tokenizer_for(recipe))
    params = list(arrangement.parameters())  # each Parameter once
    embeddings = {m.weight.data_ptr() for m in arrangement.modules() if isinstance(m, torch.nn.Embedding)}
    trainable = sum(p.numel() for p in params if p.requires_grad)
    return {
        "base_models": len(embeddings),
        "parameters": sum(p.numel() for p in params),
        "parameter_mib": sum(p.numel() * p.element_size() for p in params) / 2**20,
        "trainable_parameters": trainable,
        "adam_state_mib": 2 * trainable * 4 / 2**20,
        "rss_built_mib": psutil.Process().memory_info().rss / 2**20,  # this process, models built
        "peak_rss_building_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10,
    }


def held_by_each(args, work: Path, recipes: dict[str, Path]) -> dict:
    """`count_held` for each arrangement, each in a fresh child (they load up to four bases)."""
    import subprocess

    held = {}
    for name, recipe in recipes.items():
        proc = subprocess.run([sys.executable, str(COUNTER), "--count-held", str(recipe)],
                              env=child_env(args.threads, work), cwd=ROOT, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
        if proc.returncode != 0 or not lines:
            raise SystemExit(f"counting {name} failed:\n{proc.stderr[-3000:]}")
        held[name] = json.loads(lines[-1])
    return held


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.count_held is not None:
        print(json.dumps(count_held(args.count_held)))
        return 0
    sys.path.insert(0, str(ROOT))
    from rlhf_cli.builtin.model import count_params, materialize
    from rlhf_cli.models.loading import load_tokenizer

    model_dir = materialize(args.model)  # before any timing: every run loads the same directory
    tokenizer = load_tokenizer(str(model_dir))
    needed = args.iterations * args.rollout_batch_size
    prompt_limit = args.max_length - args.max_new_tokens
    rows, dropped = usable_prompts(read_hh(args.data), tokenizer, prompt_limit, needed)
    if len(rows) < needed:
        raise SystemExit(f"only {len(rows)} prompts fit {prompt_limit} tokens; {needed} are needed")

    work = make_work_dir(args.keep, "rlhf-bench-ppo-")
    try:
        prompts = work / "prompts.jsonl"
        write_jsonl(prompts, rows)
        print(f"data: {len(rows)} HH prompts of at most {prompt_limit} tokens from {args.data} ({dropped} "
              f"longer ones skipped); {args.iterations} iterations x {args.rollout_batch_size} prompts; "
              f"work dir {work}", flush=True)
        rm_dir, rm_info = (args.reward_model, {"given": str(args.reward_model)}) if args.reward_model \
            else (work / "rm", None)
        recipes = {}
        for name in args.arrangements:
            recipes[name] = work / f"ppo-{name}.yaml"
            recipes[name].write_text(ppo_recipe(args, name, prompts, rm_dir), encoding="utf-8")
        if args.dry_run:
            for name, recipe in recipes.items():
                print(f"{name}:", " ".join(ppo_argv(recipe, work / f"{name}-run0")))
            return 0
        if rm_info is None:
            print(f"reward model: training {args.rm_steps} steps of `rlhf rm` on builtin:{args.model} ...",
                  flush=True)
            rm_dir, rm_info = train_rm(args, work)  # into work/rm, which the recipes name

        runs: dict[str, list[dict]] = {name: [] for name in args.arrangements}
        for run in range(args.repeats):
            for name in args.arrangements:
                load = loadavg()
                print(f"run {run + 1}/{args.repeats}: {name} (load average {load:.2f}) ...", flush=True)
                result = run_arrangement(args, work, name, recipes[name], run)
                result["loadavg_before"] = load
                runs[name].append(result)
                print(f"  {result['time_iteration']:.2f} s/iteration (generate "
                      f"{result['time_generate']:.2f}, score {result['time_score']:.2f}, train "
                      f"{result['time_train']:.2f}), peak RSS {result['measured'].peak_rss / 2**20:.0f} MiB",
                      flush=True)
        per = {name: summarize(r) for name, r in runs.items()}
        held = {} if args.no_count else held_by_each(args, work, recipes)
        ratio = ratios_vs_separate(per, held)
        result = {
            **header("ppo-arrangements"),
            "setup": {
                "model": args.model, "params": count_params(args.model), "threads": args.threads,
                "rollout_batch_size": args.rollout_batch_size, "mini_batch_size": args.mini_batch_size,
                "ppo_epochs": args.ppo_epochs, "max_new_tokens": args.max_new_tokens,
                "max_length": args.max_length, "lr": args.lr, "seed": args.seed,
                "lora": {"r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.0,
                         "target_modules": "all-linear"},
                "iterations": args.iterations, "warmup_iterations": args.warmup_iterations,
                "timed_iterations": args.iterations - args.warmup_iterations, "repeats": args.repeats,
                "prompts": len(rows), "prompt_limit_tokens": prompt_limit, "reward_model": rm_info,
                "gradient_checkpointing": args.gradient_checkpointing,
                "micro_batch_size": args.micro_batch_size,
                "loadavg_median": median([r["loadavg_before"] for rs in runs.values() for r in rs]),
                "contended": contention(per, args.threads),
            },
            "arrangements": per,
            "held": held,
            "ratio_vs_separate": ratio,
            "goal": goal_of(ratio),
        }
        print_table(result)
        write_json(result, args.json_out)
        return 0
    finally:
        if args.keep is None:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
