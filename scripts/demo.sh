#!/usr/bin/env bash
# The whole pipeline on the embedded default, offline, on a CPU: SFT with LoRA on the
# built-in "sort the letters" task, merge the adapter, and check the merged model with
# plain transformers. Runs write to runs/ (re-running replaces them).
set -euo pipefail
cd "$(dirname "$0")/.."
RLHF=.venv/bin/rlhf
PY=.venv/bin/python

echo "== 1/3  SFT (LoRA) on the built-in sort task"
$RLHF sft --recipe recipes/tiny-sft.yaml --output-dir runs/demo-sft --overwrite

echo "== 2/3  merge the LoRA adapter into a standalone model"
$RLHF merge-lora runs/demo-sft --out runs/demo-sft-merged --overwrite

echo "== 3/3  score before and after"
$PY scripts/demo_summary.py runs/demo-sft runs/demo-sft-merged
