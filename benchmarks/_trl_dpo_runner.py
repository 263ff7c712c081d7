"""trl's DPOTrainer side of `bench_dpo.py`; run by it in a fresh process, not meant to be run by hand.

Trains LoRA with DPO on a prompt/chosen/rejected jsonl whose rows are already in the order the
batches must take (the bench writes them in our tool's batch order; the sampler here is
sequential). The reference is the model with the adapter disabled (trl's default with a
`peft_config` and no `ref_model`), or log-probs precomputed once with `--precompute-ref`. Writes a
JSON report like the SFT runner's: step times, every batch's tokens, the prepared token ids.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _trl_common import add_clock, common_args, count_batches, lora, training_args, write_report


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    common_args(p)
    p.add_argument("--beta", type=float, default=0.1)
    p.add_argument("--precompute-ref", action="store_true")
    return p.parse_args(argv)


def count_dpo(batch) -> dict:
    completion = batch["completion_mask"]
    return {"trained_tokens": int(completion[:, 1:].sum()),
            "input_tokens": int(batch["attention_mask"].sum()),
            "padded_tokens": int(batch["input_ids"].numel())}


def as_examples(prepared, max_length: int) -> list[dict]:
    """Per pair, chosen then rejected, as `{"input_ids", "labels"}` cut at max_length the way the
    collator cuts them (`truncation_mode="keep_start"`): what the model is trained on."""
    out = []
    for prompt, chosen, rejected in zip(prepared["prompt_ids"], prepared["chosen_ids"],
                                        prepared["rejected_ids"], strict=True):
        for answer in (chosen, rejected):
            out.append({"input_ids": (list(prompt) + list(answer))[:max_length],
                        "labels": ([-100] * len(prompt) + list(answer))[:max_length]})
    return out


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import DPOConfig, DPOTrainer

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    config = DPOConfig(
        **training_args(args),
        beta=args.beta,
        loss_type=["sigmoid"],
        truncation_mode="keep_start",
        padding_free=False,
        precompute_ref_log_probs=args.precompute_ref,
        precompute_ref_batch_size=args.batch_size,  # ours: train.batch_size (no eval batch size set)
        disable_dropout=True,  # the default; the bench uses LoRA dropout 0 on both sides anyway
    )
    trainer = DPOTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora(args))
    batches = count_batches(trainer, count_dpo)
    record = add_clock(trainer)

    prepared = trainer.train_dataset
    examples = as_examples(prepared, args.max_length)

    call_start = time.perf_counter()
    trainer.train()
    call_end = time.perf_counter()
    write_report(args.report, trainer, record, started, {
        "rows_in": len(rows), "rows_prepared": len(prepared), "examples": examples, "batches": batches,
        "train_call_s": call_end - call_start, "precompute_ref": args.precompute_ref,
    })


if __name__ == "__main__":
    main()
