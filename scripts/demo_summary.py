"""Summarise `make demo`: the built-in task's score through SFT, DPO and PPO, the held-out
preference accuracy of the reward model and of the DPO policy, PPO's reward-model score and
KL at its start and end, and a few answers from the merged SFT, DPO and PPO models loaded
with plain transformers (no peft, no rlhf). Task scores come from the task's reward function
(the checkable answer), never from the reward model that PPO optimised."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table


def metric_rows(run_dir: Path, split: str | None) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r.get("split") == split]


def eval_rows(run_dir: Path) -> list[dict]:
    return metric_rows(run_dir, "eval")


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


def task_table(sft: list[dict], dpo: list[dict], ppo: list[dict]) -> Table:
    table = Table(title="built-in sort task: held-out prompts, greedy answers, scored by sort_reward")
    for column in ("model", "training steps", "score (partial credit)", "solved exactly"):
        table.add_column(column)
    table.add_row("base (random init)", "0", f"{sft[0]['score']:.3f}", f"{sft[0]['solved']:.1%}")
    table.add_row("SFT", str(sft[-1]["step"]), f"{sft[-1]['score']:.3f}", f"{sft[-1]['solved']:.1%}")
    for name, rows in (("SFT + DPO", dpo), ("SFT + PPO (RM reward)", ppo)):
        row = rows[-1]
        table.add_row(name, f"{sft[-1]['step']} + {row['step']}", f"{row['score']:.3f}",
                      f"{row['solved']:.1%}")
    return table


def ppo_table(train: list[dict], evals: list[dict]) -> Table:
    """Start and end of the PPO run: the reward it maximised, the KL it paid, the task score."""
    n = max(1, min(5, len(train) // 4))  # the sampled score is noisy: average a few iterations

    def mean(rows: list[dict], key: str) -> float:
        return sum(r[key] for r in rows) / len(rows)

    table = Table(title=f"PPO (1base-1lora, reward = the reward model), {len(train)} iterations; "
                        "task scores on held-out prompts")
    for column in ("", f"start (iter. 1-{n})", f"end (iter. {len(train) - n + 1}-{len(train)})"):
        table.add_column(column)
    first, last = train[:n], train[-n:]
    table.add_row("RM score of the rollouts (T=0.7)", f"{mean(first, 'score'):.2f}",
                  f"{mean(last, 'score'):.2f}")
    table.add_row("KL(π‖π_ref), nats per response", f"{mean(first, 'kl'):.2f}", f"{mean(last, 'kl'):.2f}")
    table.add_row("task score (sort_reward, greedy)", f"{evals[0]['score']:.3f} (step 0)",
                  f"{evals[-1]['score']:.3f} (step {evals[-1]['step']})")
    table.add_row("solved exactly (greedy)", f"{evals[0]['solved']:.1%}",
                  f"{evals[-1]['solved']:.1%}")
    return table


def preference_table(rm: dict, dpo: dict, by_fn: dict, by_rm: dict, ppo: dict) -> tuple[Table, Table]:
    table = Table(title=f"rlhf eval: {rm['num_pairs']} held-out preference pairs "
                        "(correct sort vs a plausible mistake)")
    for column in ("model", "what prefers chosen", "accuracy", "mean margin"):
        table.add_column(column)
    table.add_row("reward model", "reward(chosen) > reward(rejected)", f"{rm['accuracy']:.3f}",
                  f"{rm['mean_margin']:.2f}")
    table.add_row("DPO policy", "β·log π/π_ref (implicit reward)", f"{dpo['accuracy']:.3f}",
                  f"{dpo['mean_margin']:.2f}")
    gen = Table(title=f"rlhf eval --generate: {by_fn['num_prompts']} held-out prompts, sampled (T=1), "
                      "each policy vs its reference (the SFT model)")
    for column in ("policy", "judge", "policy mean", "ref. mean", "win rate", "KL"):
        gen.add_column(column)
    for policy, name, g in (("SFT + DPO", "sort_reward (task)", by_fn),
                            ("SFT + DPO", "reward model", by_rm),
                            ("SFT + PPO, merged", "sort_reward (task)", ppo)):
        gen.add_row(policy, name, f"{g['mean_reward']:.3f}", f"{g['reference_mean_reward']:.3f}",
                    f"{g['win_rate']:.3f}", f"{g['kl']:.2f}")
    return table, gen


def main(runs: str) -> None:
    from rlhf_cli.builtin.tasks import sort_reward, sort_rows
    from rlhf_cli.quiet import quiet_libraries

    quiet_libraries()
    root = Path(runs)
    reports = {name: json.loads((root / "demo-eval" / f"{name}.json").read_text())
               for name in ("rm", "dpo", "dpo-judged-by-rm", "ppo")}
    console = Console()
    ppo_evals = eval_rows(root / "demo-ppo")
    console.print(task_table(eval_rows(root / "demo-sft"), eval_rows(root / "demo-dpo"), ppo_evals))
    ppo_train = [r for r in metric_rows(root / "demo-ppo", None) if "score" in r and "kl" in r]
    console.print(ppo_table(ppo_train, ppo_evals))
    tables = preference_table(reports["rm"], reports["dpo"], reports["dpo"]["generation"],
                              reports["dpo-judged-by-rm"]["generation"], reports["ppo"]["generation"])
    for table in tables:
        console.print(table)

    prompts = [r["prompt"] for r in sort_rows("prompts", "eval", 6)]
    names = {"sft": "SFT", "dpo": "SFT + DPO", "ppo": "SFT + PPO"}
    answers = {name: answer(root / f"demo-{name}-merged", prompts) for name in names}
    table = Table(title="merged models, plain transformers (no peft), greedy; reward = sort_reward")
    table.add_column("prompt")
    for title in names.values():
        table.add_column(title)
        table.add_column("reward")
    scores = {name: sort_reward(prompts, replies) for name, replies in answers.items()}
    for i, prompt in enumerate(prompts):
        cells = [prompt]
        for name in names:
            cells += [repr(answers[name][i]), f"{scores[name][i]:.2f}"]
        table.add_row(*cells)
    console.print(table)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "runs")
