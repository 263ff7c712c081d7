"""What the trl runners share (they run in fresh processes started by the benches).

`Clock` prints "TRAIN_BEGIN" when training starts and "step N/TOTAL" after every step, the same
kind of lines our CLI prints, so the parent samples every process's RSS and CPU time at the same
points; it also keeps a clock of its own and the logged metrics. `count_batches` wraps a data
collator to record the tokens of every batch the trainer builds.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from _common import add_lora_args, add_size_args


def common_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="a Hugging Face model directory")
    p.add_argument("--data", required=True, help="jsonl rows, already in batch order")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--report", required=True, help="where to write the JSON report")
    p.add_argument("--max-steps", type=int, required=True)
    add_size_args(p, lr=2e-4)
    add_lora_args(p, dropout=0.05)
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--threads", type=int, required=True)


def load(args):
    """With `args.threads` torch threads and trl imported: the jsonl rows, their dataset, the
    tokenizer and the model (fp32)."""
    import torch

    torch.set_num_threads(args.threads)

    import trl  # noqa: F401  (the runner's trainer: imported before the data and the model are read)
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    rows = [json.loads(line) for line in Path(args.data).read_text().splitlines() if line.strip()]
    dataset = Dataset.from_list(rows)
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32)
    return rows, dataset, tokenizer, model


def make_trainer(trainer_cls, config, model, dataset, tokenizer, args, count):
    """The trl trainer with LoRA, its batches counted with `count` and the clock below added:
    (trainer, batches, record)."""
    trainer = trainer_cls(model=model, args=config, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=lora(args))
    batches = count_batches(trainer, count)
    record = add_clock(trainer)
    return trainer, batches, record


def train(args, trainer, record: dict, started: float, rows: list, prepared, examples: list[dict],
          batches: list[dict], **extra) -> None:
    """Train, then write the report: what the trainer `prepared` from `rows`, and `extra`."""
    call_start = time.perf_counter()
    trainer.train()
    call_end = time.perf_counter()
    write_report(args.report, trainer, record, started, {
        "rows_in": len(rows), "rows_prepared": len(prepared), "examples": examples,
        "batches": batches, "train_call_s": call_end - call_start, **extra,
    })


def training_args(args) -> dict:
    """TrainingArguments both runners set alike (and as our recipes do)."""
    return dict(
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
        bf16=False,  # trl's configs default bf16 to True
        fp16=False,
        gradient_checkpointing=False,  # trl's configs default it to True
        max_length=args.max_length,
        train_sampling_strategy="sequential",  # rows are already in our tool's batch order
        dataloader_num_workers=0,
        disable_tqdm=True,
    )


def lora(args):
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules="all-linear", bias="none", task_type="CAUSAL_LM")


def count_batches(trainer, count) -> list[dict]:
    """Wrap the trainer's collator (read when train() builds the dataloader) so that every batch's
    `count(batch)` is appended to the returned list."""
    batches: list[dict] = []
    collate = trainer.data_collator

    def counting_collator(examples):
        batch = collate(examples)
        batches.append(count(batch))
        return batch

    trainer.data_collator = counting_collator
    return batches


def add_clock(trainer):
    """A callback with the step lines and clock described above; returns its record."""
    import psutil
    from transformers import TrainerCallback

    record: dict = {"step_times": [], "logs": []}
    process = psutil.Process()

    class Clock(TrainerCallback):
        def on_train_begin(self, args_, state, control, **kwargs):
            record["rss_before_train"] = process.memory_info().rss
            record["train_begin"] = time.perf_counter()
            print("TRAIN_BEGIN", flush=True)

        def on_step_end(self, args_, state, control, **kwargs):
            record["step_times"].append(time.perf_counter())
            print(f"step {state.global_step}/{state.max_steps}", flush=True)

        def on_log(self, args_, state, control, logs=None, **kwargs):
            if logs:
                row = {k: v for k, v in logs.items() if isinstance(v, (int, float))}
                record["logs"].append({"step": state.global_step, **row})

    trainer.add_callback(Clock())
    return record


def write_report(path: str, trainer, record: dict, started: float, extra: dict) -> None:
    import torch

    trainable = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    report = {
        "side": "trl",
        "threads": torch.get_num_threads(),
        "trainable_params": trainable,
        "train_begin": record["train_begin"] - started,
        "step_times": [t - record["train_begin"] for t in record["step_times"]],
        "rss_before_train": record["rss_before_train"],
        "logs": record["logs"],
        **extra,
    }
    Path(path).write_text(json.dumps(report))
