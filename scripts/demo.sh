#!/usr/bin/env bash
# The whole pipeline on the embedded default, offline, on a CPU, in about 3 minutes:
# a short SFT with LoRA on the built-in "sort the letters" task, merge, then a reward model
# and DPO on the merged SFT model, and `rlhf eval` of both on held-out preference pairs.
# The SFT is cut short on purpose (30 steps: it sorts about half the letters right), so
# that DPO has room to improve the task score. Runs write to runs/ (re-running replaces them).
set -euo pipefail
cd "$(dirname "$0")/.."
RLHF=.venv/bin/rlhf
PY=.venv/bin/python
# A tiny model gains nothing from several threads, and spinning OpenMP threads on a busy
# machine make each step many times slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SORT_REWARD=rlhf_cli.builtin.tasks:sort_reward

echo "== 1/7  SFT (LoRA), 30 steps, on the built-in sort task"
$RLHF sft --recipe recipes/tiny-sft.yaml --output-dir runs/demo-sft --overwrite \
  --set train.max_steps=30 --set train.warmup_steps=5 --set train.log_every=10 \
  --set train.eval_every=null --set train.save_every=null

echo "== 2/7  merge the SFT adapter into a standalone model"
$RLHF merge-lora runs/demo-sft --out runs/demo-sft-merged --overwrite

echo "== 3/7  reward model (LoRA + scalar head) on the SFT model"
$RLHF rm --recipe recipes/tiny-rm.yaml --output-dir runs/demo-rm --overwrite \
  --set model.base=runs/demo-sft-merged

echo "== 4/7  DPO on the SFT model (reference: the SFT model, adapter disabled)"
$RLHF dpo --recipe recipes/tiny-dpo.yaml --output-dir runs/demo-dpo --overwrite \
  --set model.base=runs/demo-sft-merged

echo "== 5/7  rlhf eval: the reward model on held-out pairs"
$RLHF eval --model runs/demo-rm --data builtin:sort:eval --out runs/demo-eval/rm.json

echo "== 6/7  rlhf eval: the DPO policy on held-out pairs, and its samples against the SFT model's"
$RLHF eval --model runs/demo-dpo --data builtin:sort:eval --out runs/demo-eval/dpo.json \
  --generate --reward-fn $SORT_REWARD
$RLHF eval --model runs/demo-dpo --data builtin:sort:eval --out runs/demo-eval/dpo-judged-by-rm.json \
  --generate --reward-model runs/demo-rm

echo "== 7/7  merge the DPO adapter; summary"
$RLHF merge-lora runs/demo-dpo --out runs/demo-dpo-merged --overwrite
$PY scripts/demo_summary.py runs
