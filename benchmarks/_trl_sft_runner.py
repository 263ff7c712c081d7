"""trl's SFTTrainer side of `bench_sft.py`; run by it in a fresh process, not meant to be run by hand.

Trains LoRA on a prompt-completion jsonl whose rows are already in the order the batches must take
(the bench writes them in our tool's batch order; the sampler here is sequential), and writes a
JSON report: the time after every optimizer step, the tokens of every batch, the prepared dataset's
token ids and labels (to check both sides train on the same tokens), and RSS before training.

Prints "TRAIN_BEGIN" on stdout when training starts and "step N/TOTAL" after every step, so that the
parent samples this process's RSS and CPU time at the same points as our CLI's.
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
    return p.parse_args(argv)


def count_sft(batch) -> dict:
    labels = batch["labels"]
    return {"trained_tokens": int((labels[:, 1:] != -100).sum()),
            "input_tokens": int(batch["attention_mask"].sum()),
            "padded_tokens": int(labels.numel())}


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()

    import torch

    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    config = SFTConfig(
        **training_args(args),
        packing=False,
        padding_free=False,
        completion_only_loss=None,  # None = completion only for prompt-completion data
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=lora(args))
    batches = count_batches(trainer, count_sft)
    record = add_clock(trainer)

    prepared = trainer.train_dataset
    examples = [{"input_ids": list(ids), "labels": list(labels)}
                for ids, labels in zip(prepared["input_ids"], prepared["labels"], strict=True)]

    call_start = time.perf_counter()
    trainer.train()
    call_end = time.perf_counter()
    write_report(args.report, trainer, record, started, {
        "rows_in": len(rows), "rows_prepared": len(prepared), "examples": examples, "batches": batches,
        "train_call_s": call_end - call_start,
    })


if __name__ == "__main__":
    main()
