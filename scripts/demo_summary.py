"""Summarise `make demo`: the built-in task's score through SFT and DPO, the held-out
preference accuracy of the reward model and of the DPO policy, and a few answers from the
merged SFT and DPO models loaded with plain transformers (no peft, no rlhf)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def eval_rows(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == "eval"]


def answer(model_dir: Path, prompts: list[str]) -> list[str]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    answers = []
    for prompt in prompts:
        ids = tokenizer(prompt, return_tensors="pt")
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=12, do_sample=False,
                                 pad_token_id=tokenizer.pad_token_id)
        answers.append(tokenizer.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True))
    return answers


def task_table(sft: list[dict], dpo: list[dict]) -> Table:
    table = Table(title="built-in sort task: held-out prompts, greedy answers")
    for column in ("model", "training steps", "score (partial credit)", "solved exactly"):
        table.add_column(column)
    rows = (("base (random init)", sft[0]), ("SFT", sft[-1]), ("SFT + DPO", dpo[-1]))
    for name, row in rows:
        steps = str(row["step"]) if name != "SFT + DPO" else f"{sft[-1]['step']} + {row['step']}"
        table.add_row(name, steps, f"{row['score']:.3f}", f"{row['solved']:.1%}")
    return table


def preference_table(rm: dict, dpo: dict, by_fn: dict, by_rm: dict) -> tuple[Table, Table]:
    table = Table(title=f"rlhf eval: {rm['num_pairs']} held-out preference pairs "
                        "(correct sort vs a plausible mistake)")
    for column in ("model", "what prefers chosen", "accuracy", "mean margin"):
        table.add_column(column)
    table.add_row("reward model", "reward(chosen) > reward(rejected)", f"{rm['accuracy']:.3f}",
                  f"{rm['mean_margin']:.2f}")
    table.add_row("DPO policy", "β·log π/π_ref (implicit reward)", f"{dpo['accuracy']:.3f}",
                  f"{dpo['mean_margin']:.2f}")
    gen = Table(title=f"rlhf eval --generate: {by_fn['num_prompts']} prompts, sampled (T=1), "
                      "DPO policy vs its reference (the SFT model)")
    for column in ("judge", "policy mean", "reference mean", "win rate", "KL(π‖π_ref)"):
        gen.add_column(column)
    for name, g in (("sort_reward (exact task score)", by_fn), ("the reward model", by_rm)):
        gen.add_row(name, f"{g['mean_reward']:.3f}", f"{g['reference_mean_reward']:.3f}",
                    f"{g['win_rate']:.3f}", f"{g['kl']:.2f}")
    return table, gen


def main(runs: str) -> None:
    from rlhf_cli.builtin.tasks import sort_reward, sort_rows
    from rlhf_cli.quiet import quiet_libraries

    quiet_libraries()
    root = Path(runs)
    reports = {name: json.loads((root / "demo-eval" / f"{name}.json").read_text())
               for name in ("rm", "dpo", "dpo-judged-by-rm")}
    console = Console()
    console.print(task_table(eval_rows(root / "demo-sft"), eval_rows(root / "demo-dpo")))
    tables = preference_table(reports["rm"], reports["dpo"], reports["dpo"]["generation"],
                              reports["dpo-judged-by-rm"]["generation"])
    for table in tables:
        console.print(table)

    prompts = [r["prompt"] for r in sort_rows("prompts", "eval", 6)]
    answers = {name: answer(root / f"demo-{name}-merged", prompts) for name in ("sft", "dpo")}
    table = Table(title="merged models, plain transformers (no peft), greedy")
    for column in ("prompt", "SFT", "reward", "SFT + DPO", "reward"):
        table.add_column(column)
    scores = {name: sort_reward(prompts, replies) for name, replies in answers.items()}
    for i, prompt in enumerate(prompts):
        table.add_row(prompt, repr(answers["sft"][i]), f"{scores['sft'][i]:.2f}",
                      repr(answers["dpo"][i]), f"{scores['dpo'][i]:.2f}")
    console.print(table)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs")
