#!/usr/bin/env bash
# ms-swift's KTO example (examples/train/rlhf/kto.sh), with `swift` -> `swiftray` and, so that it runs
# offline on a CPU in a few minutes:
#   --model      a tiny Qwen3-style model, built here if missing (MODEL=path to use another)
#   --dataset    AI-ModelScope/ultrafeedback-binarized-preferences-cleaned-kto#10000 -> the built-in
#                swiftray/arithmetic-pairs:easy_train_kto (each right answer labelled true, each wrong one false)
#   NPROC_PER_NODE  two workers, as the guide (NPROC_PER_NODE=1 for one)
#   --max_steps  added to cut the run short (MAX_STEPS=-1 trains the whole epoch)
# The guide's --load_from_cache_file is left out; every other flag is the guide's (ZeRO-2 runs on CPU too).
# Checkpoints go to output/kto/vN-*/.
set -euo pipefail

MODEL=${MODEL:-tiny-qwen3}
MAX_STEPS=${MAX_STEPS:-10}
nproc_per_node=${NPROC_PER_NODE:-2}
if [ ! -f "$MODEL/config.json" ]; then
    swiftray make-tiny-model --output_dir "$MODEL"
fi

NPROC_PER_NODE=$nproc_per_node \
swiftray rlhf \
    --rlhf_type kto \
    --model "$MODEL" \
    --tuner_type lora \
    --dataset 'swiftray/arithmetic-pairs:easy_train_kto#800' \
    --split_dataset_ratio 0.01 \
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
    --output_dir output/kto \
    --warmup_ratio 0.05 \
    --dataloader_num_workers 4 \
    --deepspeed zero2 \
    --dataset_num_proc 4 \
    --max_steps "$MAX_STEPS"
