#!/usr/bin/env bash
# ms-swift's DPO example (examples/train/rlhf/dpo/lora.sh), with `swift` -> `swiftray` and, so that it
# runs offline on a CPU in a few minutes:
#   --model      a tiny Qwen3-style model, built here if missing (MODEL=path to use another, e.g. an SFT
#                checkpoint: the reference model is a frozen copy of --model)
#   --dataset    hjh0119/shareAI-Llama3-DPO-zh-en-emoji -> the built-in swiftray/arithmetic-pairs
#                (right answer chosen, a plausible wrong one rejected)
#   --max_steps  added to cut the run short (MAX_STEPS=-1 trains the whole epoch)
# The guide's --load_from_cache_file is left out (datasets caches here anyway); every other flag is the
# guide's. Checkpoints go to output/dpo/vN-*/.
set -euo pipefail

MODEL=${MODEL:-tiny-qwen3}
MAX_STEPS=${MAX_STEPS:-20}
if [ ! -f "$MODEL/config.json" ]; then
    swiftray make-tiny-model --output_dir "$MODEL"
fi

CUDA_VISIBLE_DEVICES=0 \
swiftray rlhf \
    --rlhf_type dpo \
    --model "$MODEL" \
    --tuner_type lora \
    --dataset 'swiftray/arithmetic-pairs:easy_train#400' \
    --split_dataset_ratio 0.01 \
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
    --output_dir output/dpo \
    --warmup_ratio 0.05 \
    --dataloader_num_workers 4 \
    --rpo_alpha 0.1 \
    --dataset_num_proc 4 \
    --max_steps "$MAX_STEPS"
