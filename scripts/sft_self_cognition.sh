#!/usr/bin/env bash
# The 30-minute self-cognition LoRA run of ms-swift's Qwen3 guide
# (reference/ms-swift-qwen3-best-practice.rst), with `swift` -> `swiftray` and, so that it runs
# offline on a CPU in a minute:
#   --model      a tiny Qwen3-style model, built here if missing (MODEL=path to use another)
#   --dataset    swift/Qwen3-SFT-Mixin#2000 -> the built-in swiftray/arithmetic#200
#   --max_steps  added to cut the run short (MAX_STEPS=-1 trains the whole epoch)
# Every other flag is the guide's. Checkpoints go to output/vN-*/; try the result with
# scripts/infer_self_cognition.sh. To train on a running cluster, set RAY_ADDRESS=host:6379 and
# RAY_AUTH_MODE=token (Ray sends its auth token to an explicit address only then);
# scripts/ray_job_submit_sft.sh submits this run as a Ray job instead.
set -euo pipefail

MODEL=${MODEL:-tiny-qwen3}
MAX_STEPS=${MAX_STEPS:-20}
if [ ! -f "$MODEL/config.json" ]; then
    swiftray make-tiny-model --output_dir "$MODEL"
fi

CUDA_VISIBLE_DEVICES=0 \
swiftray sft \
    --model "$MODEL" \
    --train_type lora \
    --dataset 'swiftray/arithmetic#200' \
              'swift/self-cognition:qwen3#600' \
    --torch_dtype bfloat16 \
    --num_train_epochs 1 \
    --per_device_train_batch_size 1 \
    --per_device_eval_batch_size 1 \
    --learning_rate 1e-4 \
    --lora_rank 8 \
    --lora_alpha 32 \
    --target_modules all-linear \
    --gradient_accumulation_steps 16 \
    --eval_steps 50 \
    --save_steps 50 \
    --save_total_limit 2 \
    --logging_steps 5 \
    --max_length 2048 \
    --output_dir output \
    --warmup_ratio 0.05 \
    --dataloader_num_workers 4 \
    --model_author swift \
    --model_name swift-robot \
    --max_steps "$MAX_STEPS"
