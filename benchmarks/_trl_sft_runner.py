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


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model", required=True, help="a Hugging Face model directory")
    p.add_argument("--data", required=True, help="jsonl of {prompt, completion} rows, in batch order")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--report", required=True, help="where to write the JSON report")
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-length", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, required=True)
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    started = time.perf_counter()

    import psutil
    import torch

    torch.set_num_threads(args.threads)

    from datasets import Dataset
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import SFTConfig, SFTTrainer

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)

    config = SFTConfig(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        gradient_accumulation_steps=1,
        learning_rate=args.lr,
        lr_scheduler_type="cosine",
        warmup_steps=0,
        weight_decay=0.0,
        max_grad_norm=1.0,
        optim="adamw_torch",  # torch.optim.AdamW, as our tool uses (trl's default is the fused one)
        logging_steps=args.log_every,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        seed=args.seed,
        data_seed=args.seed,
        use_cpu=True,
        bf16=False,  # SFTConfig defaults bf16 to True
        fp16=False,
        gradient_checkpointing=False,  # SFTConfig defaults it to True
        max_length=args.max_length,
        packing=False,
        padding_free=False,
        completion_only_loss=None,  # None = completion only for prompt-completion data
        train_sampling_strategy="sequential",  # rows are already in our tool's batch order
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    peft_config = LoraConfig(
        r=args.lora_r,
        lora_alpha=args.lora_alpha,
        lora_dropout=args.lora_dropout,
        target_modules="all-linear",
        bias="none",
        task_type="CAUSAL_LM",
    )
    trainer = SFTTrainer(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                         peft_config=peft_config)

    batches: list[dict] = []
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        labels = batch["labels"]
        batches.append({
            "trained_tokens": int((labels[:, 1:] != -100).sum()),
            "input_tokens": int(batch["attention_mask"].sum()),
            "padded_tokens": int(labels.numel()),
        })
        return batch

    trainer.data_collator = counting_collator  # read when train() builds the dataloader

    step_times: list[float] = []
    records: list[dict] = []
    marks: dict = {}
    process = psutil.Process()

    class Clock(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kwargs):
            marks["rss_before_train"] = process.memory_info().rss
            marks["train_begin"] = time.perf_counter()
            print("TRAIN_BEGIN", flush=True)

        def on_step_end(self, args_, state, control, **kwargs):
            step_times.append(time.perf_counter())
            # the same kind of line our CLI logs, so the parent reads both sides' CPU time alike
            print(f"step {state.global_step}/{state.max_steps}", flush=True)

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs:
                row = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
                records.append({"step": state.global_step, **row})

    trainer.add_callback(Clock())

    prepared = trainer.train_dataset
    examples = [{"input_ids": list(ids), "labels": list(labels)}
                for ids, labels in zip(prepared["input_ids"], prepared["labels"], strict=True)]

    call_start = time.perf_counter()
    trainer.train()
    call_end = time.perf_counter()

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    report = {
        "side": "trl",
        "threads": torch.get_num_threads(),
        "trainable_params": trainable,
        "rows_in": len(rows),
        "rows_prepared": len(prepared),
        "examples": examples,
        "batches": batches,
        "train_begin": marks["train_begin"] - started,
        "step_times": [t - marks["train_begin"] for t in step_times],
        "train_call_s": call_end - call_start,
        "rss_before_train": marks["rss_before_train"],
        "logs": records,
    }
    Path(args.report).write_text(json.dumps(report))


if __name__ == "__main__":
    main()
