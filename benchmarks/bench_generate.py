"""`rlhf generate` throughput against plain transformers `generate` on the merged model.

    .venv/bin/python benchmarks/bench_generate.py [--model small] [--prompts 24] [--n 4]
        [--batch-size 8] [--max-new-tokens 32] [--repeats 3] [--threads 2] [--json-out FILE]

Setup: an SFT-like LoRA run on `builtin:MODEL` (recipe.yaml, final/ adapter with random B so
the policy is not its base), merged by `rlhf merge-lora`'s own code into a plain model
directory. Prompts: `builtin:sort:train:P`, read as `rlhf generate` reads them; both sides
get the same prompt token ids in the same batches (`--batch-size` prompts x `--n` samples, left
padded), sample with temperature 1, top-p 1, top-k off, `--max-new-tokens`, seeded alike, and
write one JSON row per prompt.

Sides, in one process, alternating, best of `--repeats` per side:
- ours (merged): `rlhf generate`'s own loop (stages/generate/run.py `sample_rows` + its
  RowWriter) on the merged directory as `rlhf generate --model MERGED` loads it;
- ours (LoRA run): the same on the LoRA run (base + adapter, not merged: what sampling an SFT
  run costs); for information;
- transformers: `AutoModelForCausalLM.from_pretrained(MERGED).generate(...)`, `batch_decode`,
  rows written with `json.dumps`.
tokens/s = response tokens generated (up to and including each EOS) / seconds of the loop;
loading is not timed. Goal: ours (merged) >= 0.8x transformers.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
GOAL = 0.8


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="small", choices=("tiny", "small", "base"))
    p.add_argument("--prompts", type=int, default=24)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    p.add_argument("--max-new-tokens", type=int, default=32)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json-out", type=Path)
    args = p.parse_args(argv)
    if min(args.prompts, args.n, args.batch_size, args.max_new_tokens, args.repeats) < 1:
        p.error("every count must be at least 1")
    return args


def make_runs(args, work: Path) -> tuple[Path, Path]:
    """(LoRA run directory, merged model directory)."""
    import torch

    from rlhf_cli.config import dump_recipe, load_recipe
    from rlhf_cli.models.policy import policy_model, tokenizer_for
    from rlhf_cli.stages.merge_lora import merge_lora

    recipe = load_recipe(ROOT / "recipes" / "tiny-sft.yaml", [f"model.base=builtin:{args.model}"])
    torch.manual_seed(0)
    model = policy_model(recipe, announce=False)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.02)
    run = work / "run"
    model.save_pretrained(str(run / "final"))
    tokenizer_for(recipe).save_pretrained(str(run / "final"))
    (run / "recipe.yaml").write_text(dump_recipe(recipe))
    return run, merge_lora(str(run), work / "merged")


def settings_for(args, model: Path, out: Path):
    from rlhf_cli.stages.generate.settings import GenerateSettings

    return GenerateSettings(model=str(model), data=f"builtin:sort:train:{args.prompts}", out=str(out),
                            n=args.n, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size)


def ours(args, model: Path, work: Path):
    """A timed pass of `rlhf generate`'s loop: returns a callable -> (seconds, tokens)."""
    from rlhf_cli.data.loaders import load_prompts
    from rlhf_cli.stages.generate.policy import load_sampling_policy
    from rlhf_cli.stages.generate.run import prompt_recipe, sample_rows
    from rlhf_cli.stages.generate.shards import RowWriter

    settings = settings_for(args, model, work / "ours.jsonl")
    lm, tokenizer, recipe = load_sampling_policy(str(model))
    prompts = load_prompts(prompt_recipe(recipe, settings), tokenizer, SimpleNamespace(is_main=False))

    def run() -> tuple[float, int]:
        out = work / f"ours-{time.monotonic_ns()}.jsonl"
        writer, tokens = RowWriter(out), 0
        started = time.perf_counter()
        for start in range(0, len(prompts), settings.batch_size):
            batch = list(range(start, min(start + settings.batch_size, len(prompts))))
            rows, generated = sample_rows(batch, prompts, lm, tokenizer, None, settings)
            writer.append(rows)
            tokens += generated
        seconds = time.perf_counter() - started
        writer.close()
        return seconds, tokens

    return run, prompts


def transformers_side(args, merged: Path, prompts, work: Path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(merged))
    lm = AutoModelForCausalLM.from_pretrained(str(merged), dtype=torch.float32).eval()
    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id

    @torch.no_grad()
    def run() -> tuple[float, int]:
        tokens = 0
        started = time.perf_counter()
        with open(work / f"hf-{time.monotonic_ns()}.jsonl", "w") as handle:
            for start in range(0, len(prompts), args.batch_size):
                indices = range(start, min(start + args.batch_size, len(prompts)))
                ids = [prompts[i]["prompt_input_ids"] for i in indices for _ in range(args.n)]
                width = max(map(len, ids))
                input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in ids])
                mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in ids])
                torch.manual_seed(start)
                out = lm.generate(input_ids=input_ids, attention_mask=mask, do_sample=True, temperature=1.0,
                                  top_p=1.0, top_k=0, max_new_tokens=args.max_new_tokens,
                                  pad_token_id=pad, eos_token_id=eos)[:, width:].tolist()
                cut = [row[: row.index(eos) + 1] if eos in row else row for row in out]
                tokens += sum(map(len, cut))
                texts = tokenizer.batch_decode(cut, skip_special_tokens=True)
                for j, i in enumerate(indices):
                    handle.write(json.dumps({"prompt": prompts[i]["prompt"],
                                             "responses": texts[j * args.n:(j + 1) * args.n]}) + "\n")
        return time.perf_counter() - started, tokens

    return run


def main(argv=None) -> dict:
    args = parse_args(argv)
    import torch

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory(prefix="bench-generate-") as tmp:
        work = Path(tmp)
        run, merged = make_runs(args, work)
        ours_merged, prompts = ours(args, merged, work)
        ours_lora, _ = ours(args, run, work)
        sides = {"ours (merged)": ours_merged, "ours (LoRA run)": ours_lora,
                 "transformers": transformers_side(args, merged, prompts, work)}
        for fn in sides.values():  # warm-up: first-call allocations and kernels
            fn()
        timings = {name: [] for name in sides}
        for _ in range(args.repeats):
            for name, fn in sides.items():
                timings[name].append(fn())
    best = {name: max(t / s for s, t in runs) for name, runs in timings.items()}
    median = {name: statistics.median(t / s for s, t in runs) for name, runs in timings.items()}
    ratio = best["ours (merged)"] / best["transformers"]
    result = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "args": vars(args) | {
        "json_out": str(args.json_out) if args.json_out else None}, "prompts_used": len(prompts),
        "runs": timings, "best_tokens_per_s": best, "median_tokens_per_s": median,
        "ours_over_transformers": ratio,
        "lora_over_transformers": best["ours (LoRA run)"] / best["transformers"], "goal": GOAL}
    for name, value in best.items():
        print(f"{name:>18}: {value:8.1f} tokens/s best of {args.repeats}, median {median[name]:.1f} "
              f"(runs: seconds, tokens {timings[name]})")
    print(f"ours (merged) / transformers = {ratio:.3f} (goal >= {GOAL})")
    if args.json_out:
        args.json_out.write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
