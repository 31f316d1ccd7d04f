#!/usr/bin/env bash
# A reward model, then GRPO with it as the reward: ms-swift's reward-model example
# (examples/train/rlhf/rm/train.sh) with `swift` -> `swiftray`, then `swiftray rlhf --rlhf_type grpo
# --reward_model` on its checkpoint (ms-swift's GRPO reward_model flag; the model's score is one more
# reward, after --reward_funcs in --reward_weights). So that it runs offline on a CPU in a few minutes:
#   --model      a tiny Qwen3-style model, built here if missing (MODEL=path to use another)
#   --dataset    hjh0119/shareAI-Llama3-DPO-zh-en-emoji -> the built-in swiftray/arithmetic-pairs
#   NPROC_PER_NODE  one worker (the guide's 2 work too: NPROC_PER_NODE=2)
#   --max_steps  added to cut both runs short
# The reward model trains with LoRA as in the guide (its score head in full) and loads merged.
# Checkpoints go to output/rm/vN-*/ and output/grpo_rm/vN-*/.
set -euo pipefail

MODEL=${MODEL:-tiny-qwen3}
MAX_STEPS=${MAX_STEPS:-10}
nproc_per_node=${NPROC_PER_NODE:-1}
if [ ! -f "$MODEL/config.json" ]; then
    swiftray make-tiny-model --output_dir "$MODEL"
fi

NPROC_PER_NODE=$nproc_per_node \
swiftray rlhf \
    --rlhf_type rm \
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
    --gradient_accumulation_steps $(expr 16 / $nproc_per_node) \
    --eval_steps 100 \
    --save_steps 100 \
    --save_total_limit 2 \
    --logging_steps 5 \
    --max_length 2048 \
    --output_dir output/rm \
    --warmup_ratio 0.05 \
    --dataloader_num_workers 4 \
    --dataset_num_proc 4 \
    --max_steps "$MAX_STEPS"

RM=$(ls -d output/rm/v*/checkpoint-* | sort -V | tail -1)
echo "reward model: $RM"

NPROC_PER_NODE=$nproc_per_node \
swiftray rlhf \
    --rlhf_type grpo \
    --model "$MODEL" \
    --tuner_type full \
    --dataset 'swiftray/arithmetic:easy_train#200' \
    --reward_model "$RM" \
    --reward_funcs format \
    --reward_weights 0.2 1.0 \
    --num_generations 4 \
    --max_completion_length 48 \
    --per_device_train_batch_size 16 \
    --gradient_accumulation_steps 1 \
    --learning_rate 1e-5 \
    --beta 0.04 \
    --logging_steps 1 \
    --save_steps "$MAX_STEPS" \
    --output_dir output/grpo_rm \
    --max_steps "$MAX_STEPS"
