#!/usr/bin/env bash
# Every stage and PPO arrangement on one CUDA GPU, in bf16, in a few minutes (for the short
# times a GPU is lent): sft -> merge-lora -> rm -> dpo -> ppo (each arrangement, then a 4-bit
# base) -> merge-lora -> eval on `builtin:base` (a ~106M random LLaMA), plus 2-process ZeRO-2
# and ZeRO-3 where there are >= 2 GPUs; then peak CUDA memory and time per iteration of each
# PPO run (read from their metrics.jsonl by scripts/gpu_check_summary.py).
#   scripts/gpu_check.sh [OUT_DIR]          (default runs/gpu-check; it is replaced)
# Without a GPU it says so and exits 0. Knobs (for testing the plan here, on a CPU):
#   GPU_CHECK_DRY=1        print the commands instead of running them
#   GPU_CHECK_DEVICE=cpu   run on the CPU (launch.cpu=true) instead of requiring CUDA
#   GPU_CHECK_MODEL=...    another base (e.g. builtin:tiny); GPU_CHECK_GPUS=N: GPU count to plan for
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
OUT=${1:-runs/gpu-check}
DRY=${GPU_CHECK_DRY:-0}
DEVICE=${GPU_CHECK_DEVICE:-cuda}
MODEL=${GPU_CHECK_MODEL:-builtin:base}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"

if [ "$DEVICE" = cuda ] && [ "$DRY" != 1 ] && ! $PY -c 'import sys, torch; sys.exit(not torch.cuda.is_available())'; then
  echo "gpu_check: no CUDA GPU here (torch.cuda.is_available() is false): nothing to check"
  exit 0
fi
GPUS=${GPU_CHECK_GPUS:-$($PY -c 'import torch; print(torch.cuda.device_count())')}

step() { echo; echo "== $*"; }
run() {  # print the command; run it unless dry
  echo "+ $*"
  [ "$DRY" = 1 ] || "$@"
}
rlhf() { run "$PY" -m rlhf_cli.cli "$@"; }

# Short runs: each step checks that the stage works in bf16 on the device, not that it learns.
COMMON=(--set "model.dtype=bf16" --set "data.eval=null" --set "train.eval_every=null"
        --set "train.eval_reward_fn=null" --set "train.save_every=null" --set "train.log_every=1"
        --set "train.batch_size=8" --set "train.max_steps=10" --overwrite)
if [ "$DEVICE" = cpu ]; then
  COMMON+=(--set "launch.cpu=true")
  export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}  # tiny models: spinning threads only slow them
fi
PPO=(--recipe recipes/tiny-ppo-1base-1lora.yaml "${COMMON[@]}" --set "model.base=$OUT/sft-merged"
     --set "ppo.reward_fn=null" --set "ppo.reward_model=$OUT/rm" --set "ppo.rollout_batch_size=16"
     --set "ppo.mini_batch_size=8" --set "ppo.ppo_epochs=1" --set "ppo.max_new_tokens=16"
     --set "train.max_steps=4")
[ "$DRY" = 1 ] || rm -rf "$OUT"
START=$SECONDS

step "sft (LoRA) on $MODEL, then merge"
rlhf sft --recipe recipes/tiny-sft.yaml -o "$OUT/sft" "${COMMON[@]}" --set "model.base=$MODEL"
rlhf merge-lora "$OUT/sft" --out "$OUT/sft-merged" --overwrite

step "rm and dpo on the merged SFT model"
rlhf rm --recipe recipes/tiny-rm.yaml -o "$OUT/rm" "${COMMON[@]}" --set "model.base=$OUT/sft-merged"
rlhf dpo --recipe recipes/tiny-dpo.yaml -o "$OUT/dpo" "${COMMON[@]}" --set "model.base=$OUT/sft-merged"

for arrangement in separate 2base-2lora 1base-2lora 1base-1lora; do
  step "ppo $arrangement (gae, reward model)"
  rlhf ppo "${PPO[@]}" -o "$OUT/ppo-$arrangement" --set "ppo.arrangement=$arrangement"
done
step "ppo 1base-1lora, grpo (critic-free)"
rlhf ppo "${PPO[@]}" -o "$OUT/ppo-1base-1lora-grpo" --set "ppo.advantage=grpo" --set "ppo.samples_per_prompt=2"

step "ppo 1base-1lora on a 4-bit base (QLoRA)"
if ! why=$($PY scripts/gpu_check_summary.py --can-quantize); then
  echo "skipped: $why"
else
  rlhf ppo "${PPO[@]}" -o "$OUT/ppo-1base-1lora-4bit" --set "model.quantization=4bit"
fi

step "merge the PPO policy; eval it against the SFT model"
rlhf merge-lora "$OUT/ppo-1base-1lora" --out "$OUT/ppo-merged" --overwrite
rlhf eval --model "$OUT/ppo-merged" --reference "$OUT/sft-merged" --data builtin:sort:eval:64 \
  --out "$OUT/eval.json" --generate --reward-fn rlhf_cli.builtin.tasks:sort_reward --max-new-tokens 16

if [ "$GPUS" -ge 2 ]; then
  for zero in zero2 zero3; do
    step "2-process DeepSpeed $zero: sft, and ppo 1base-1lora"
    ZERO=(--set "launch.num_processes=2" --set "launch.deepspeed=recipes/deepspeed/$zero.json"
          --set "launch.mixed_precision=bf16")
    rlhf sft --recipe recipes/tiny-sft.yaml -o "$OUT/sft-$zero" "${COMMON[@]}" --set "model.base=$MODEL" "${ZERO[@]}"
    rlhf ppo "${PPO[@]}" -o "$OUT/ppo-1base-1lora-$zero" "${ZERO[@]}"
  done
else
  step "2-process ZeRO-2/ZeRO-3 skipped: $GPUS GPU(s) here, they need 2"
fi

step "summary ($((SECONDS - START)) s in all)"
run "$PY" scripts/gpu_check_summary.py "$OUT"
