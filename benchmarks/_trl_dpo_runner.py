"""trl's DPOTrainer side of `bench_dpo.py`; run by it in a fresh process, not meant to be run by hand.

Trains LoRA with DPO on a prompt/chosen/rejected jsonl whose rows are already in the order the
batches must take (the bench writes them in our tool's batch order; the sampler here is
sequential). The reference is the model with the adapter disabled (trl's default with a
`peft_config` and no `ref_model`), or log-probs precomputed once with `--precompute-ref`. Writes a
JSON report like the SFT runner's: step times, every batch's tokens, the prepared token ids.
"""

from __future__ import annotations

import argparse
import time

from _trl_common import common_args, load, make_trainer, train, training_args


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

    rows, dataset, tokenizer, model = load(args)

    from trl import DPOConfig, DPOTrainer

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
    trainer, batches, record = make_trainer(DPOTrainer, config, model, dataset, tokenizer, args, count_dpo)

    prepared = trainer.train_dataset
    examples = as_examples(prepared, args.max_length)

    train(args, trainer, record, started, rows, prepared, examples, batches,
          precompute_ref=args.precompute_ref)


if __name__ == "__main__":
    main()
