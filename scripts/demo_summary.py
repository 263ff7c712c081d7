"""Print the built-in task's score before and after training, and let the merged model,
loaded with plain transformers, answer a few held-out prompts."""

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


def main(run_dir: str, merged_dir: str) -> None:
    from rlhf_cli.builtin.tasks import sort_reward, sort_rows
    from rlhf_cli.quiet import quiet_libraries

    quiet_libraries()

    console = Console()
    rows = eval_rows(Path(run_dir))
    first, last = rows[0], rows[-1]
    table = Table(title="built-in sort task, held-out prompts (greedy)")
    for column in ("", "step", "score (partial credit)", "solved exactly", "eval loss"):
        table.add_column(column)
    for name, row in (("before", first), ("after", last)):
        table.add_row(name, str(row["step"]), f"{row['score']:.3f}", f"{row['solved']:.1%}",
                      f"{row['loss']:.3f}")
    console.print(table)
    prompts = [r["prompt"] for r in sort_rows("prompts", "eval", 5)]
    answers = answer(Path(merged_dir), prompts)
    scores = sort_reward(prompts, answers)
    console.print(f"merged model ({merged_dir}, plain transformers, no peft):")
    for prompt, reply, score in zip(prompts, answers, scores, strict=True):
        console.print(f"  {prompt!r:>22} -> {reply!r:<12} reward {score:.2f}", highlight=False)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
