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
import time

from _trl_common import common_args, load, make_trainer, train, training_args


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

    rows, dataset, tokenizer, model = load(args)

    from trl import SFTConfig, SFTTrainer

    config = SFTConfig(
        **training_args(args),
        packing=False,
        padding_free=False,
        completion_only_loss=None,  # None = completion only for prompt-completion data
    )
    trainer, batches, record = make_trainer(SFTTrainer, config, model, dataset, tokenizer, args, count_sft)

    prepared = trainer.train_dataset
    examples = [{"input_ids": list(ids), "labels": list(labels)}
                for ids, labels in zip(prepared["input_ids"], prepared["labels"], strict=True)]

    train(args, trainer, record, started, rows, prepared, examples, batches)


if __name__ == "__main__":
    main()
