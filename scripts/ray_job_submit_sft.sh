#!/usr/bin/env bash
# scripts/sft_self_cognition.sh as a Ray job, on a cluster that is already running:
#
#   ray start --head          # once, on the head node (`ray stop` ends it)
#   bash scripts/ray_job_submit_sft.sh
#
# `ray job submit` ships the current folder (--working-dir .) and runs `swiftray sft` on the cluster;
# swiftray joins that cluster (RAY_ADDRESS is set inside a job). The job server is found at
# RAY_API_SERVER_ADDRESS (default http://127.0.0.1:8265, the head's dashboard).
# Ray enables token auth by default: the client sends ~/.ray/auth_token only with RAY_AUTH_MODE=token.
# The guide's CUDA_VISIBLE_DEVICES=0 is left out: Ray gives each policy worker its own GPU.
# Paths are absolute so that checkpoints land in ./output here, not in the job's copy of the folder;
# on a multi-node cluster, put --model and --output_dir on storage every node sees.
set -euo pipefail

MODEL=${MODEL:-tiny-qwen3}
MAX_STEPS=${MAX_STEPS:-20}
if [ ! -f "$MODEL/config.json" ]; then
    swiftray make-tiny-model --output_dir "$MODEL"
fi
MODEL=$(cd "$MODEL" && pwd)
export RAY_AUTH_MODE=${RAY_AUTH_MODE:-token}

ray job submit --working-dir . -- \
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
    --output_dir "$PWD/output" \
    --warmup_ratio 0.05 \
    --dataloader_num_workers 4 \
    --model_author swift \
    --model_name swift-robot \
    --max_steps "$MAX_STEPS"
