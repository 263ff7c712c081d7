#!/usr/bin/env bash
# The whole pipeline on the embedded default, offline, on a CPU, in a few minutes:
# a short SFT with LoRA on the built-in "sort the letters" task, merge, a reward model and
# DPO on the merged SFT model, then PPO (one base, one LoRA shared by actor and critic) with
# that reward model as its reward, merge the PPO policy, and `rlhf eval` of everything on
# held-out data: the task's own reward function (the checkable answer) judges the answers.
# The SFT is cut short on purpose (40 steps: greedy, it solves about half the held-out
# prompts exactly), so that DPO and PPO have room to improve the task score. Runs write to
# runs/ (re-running replaces them).
set -euo pipefail
cd "$(dirname "$0")/.."
RLHF=.venv/bin/rlhf
PY=.venv/bin/python
# A tiny model gains nothing from several threads, and spinning OpenMP threads on a busy
# machine make each step many times slower.
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
SORT_REWARD=rlhf_cli.builtin.tasks:sort_reward

echo "== 1/9  SFT (LoRA), 40 steps, on the built-in sort task"
$RLHF sft --recipe recipes/tiny-sft.yaml --output-dir runs/demo-sft --overwrite \
  --set train.max_steps=40 --set train.warmup_steps=5 --set train.log_every=10 \
  --set train.eval_every=null --set train.save_every=null

echo "== 2/9  merge the SFT adapter into a standalone model"
$RLHF merge-lora runs/demo-sft --out runs/demo-sft-merged --overwrite

echo "== 3/9  reward model (LoRA + scalar head) on the SFT model"
$RLHF rm --recipe recipes/tiny-rm.yaml --output-dir runs/demo-rm --overwrite \
  --set model.base=runs/demo-sft-merged

echo "== 4/9  DPO on the SFT model (reference: the SFT model, adapter disabled)"
$RLHF dpo --recipe recipes/tiny-dpo.yaml --output-dir runs/demo-dpo --overwrite \
  --set model.base=runs/demo-sft-merged

echo "== 5/9  PPO on the SFT model: reward = the reward model (a frozen adapter on the same base)"
$RLHF ppo --recipe recipes/tiny-ppo-1base-1lora.yaml --output-dir runs/demo-ppo --overwrite \
  --set model.base=runs/demo-sft-merged --set ppo.reward_fn=null --set ppo.reward_model=runs/demo-rm \
  --set train.save_every=null

echo "== 6/9  rlhf eval: the reward model on held-out pairs"
$RLHF eval --model runs/demo-rm --data builtin:sort:eval --out runs/demo-eval/rm.json

echo "== 7/9  rlhf eval: the DPO policy on held-out pairs, and its samples against the SFT model's"
$RLHF eval --model runs/demo-dpo --data builtin:sort:eval --out runs/demo-eval/dpo.json \
  --generate --reward-fn $SORT_REWARD
$RLHF eval --model runs/demo-dpo --data builtin:sort:eval --out runs/demo-eval/dpo-judged-by-rm.json \
  --generate --reward-model runs/demo-rm

echo "== 8/9  merge the DPO and PPO adapters; rlhf eval of the merged PPO model against the SFT model"
$RLHF merge-lora runs/demo-dpo --out runs/demo-dpo-merged --overwrite
$RLHF merge-lora runs/demo-ppo --out runs/demo-ppo-merged --overwrite
$RLHF eval --model runs/demo-ppo-merged --reference runs/demo-sft-merged --data builtin:sort:eval \
  --out runs/demo-eval/ppo.json --generate --reward-fn $SORT_REWARD

echo "== 9/9  summary"
$PY scripts/demo_summary.py runs
