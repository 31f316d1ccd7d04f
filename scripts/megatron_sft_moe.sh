#!/usr/bin/env bash
# The Megatron-SWIFT run of ms-swift's Qwen3 guide (reference/ms-swift-qwen3-best-practice.rst,
# "Megatron-SWIFT": Qwen3-30B-A3B on 2 nodes x 8 GPUs), with `megatron` -> `swiftray megatron` and,
# so that it runs offline on two CPU ranks in a minute or two:
#   --load        Qwen3-30B-A3B-Base-mcore -> a tiny Qwen3-MoE (4 experts, top-2), built and converted
#                 here with `swiftray export --to_mcore true` if missing (MODEL=path to use another)
#   --dataset     liucong/Chinese-DeepSeek-R1-Distill-data-110k-SFT -> the built-in swiftray/arithmetic#200
#   sizes         2 ranks (NPROC_PER_NODE=2): TP 2 with sequence parallel and EP 2 (was EP 8),
#                 --global_batch_size 16 -> 4, --max_length 8192 -> 512, --dataset_num_proc 8 -> 1
#   steps         --train_iters 2000 -> 4 (TRAIN_ITERS), --lr_warmup_iters 100 -> 1,
#                 --eval_interval / --save_interval 200 -> 2
# Every other flag is the guide's. On CPU, --moe_grouped_gemm, --use_flash_attn and
# --cross_entropy_loss_fusion (GPU kernels) are explained once in the log and the run goes on
# without them. The last checkpoint is converted back to an HF folder at the end.
set -euo pipefail

MODEL=${MODEL:-tiny-qwen3-moe}
OUTPUT=${OUTPUT:-megatron_output/tiny-qwen3-moe}
TRAIN_ITERS=${TRAIN_ITERS:-4}
if [ ! -f "$MODEL/config.json" ]; then
    swiftray make-tiny-model --moe true --output_dir "$MODEL"
fi
if [ ! -f "$MODEL-mcore/mcore_config.json" ]; then
    swiftray export --model "$MODEL" --to_mcore true --output_dir "$MODEL-mcore"
fi

NPROC_PER_NODE=2 \
NNODES=${NNODES:-1} \
NODE_RANK=${NODE_RANK:-0} \
swiftray megatron sft \
    --load "$MODEL-mcore" \
    --dataset 'swiftray/arithmetic#200' \
    --tensor_model_parallel_size 2 \
    --expert_model_parallel_size 2 \
    --moe_grouped_gemm true \
    --moe_shared_expert_overlap true \
    --moe_aux_loss_coeff 0.01 \
    --micro_batch_size 1 \
    --global_batch_size 4 \
    --packing true \
    --recompute_granularity full \
    --recompute_method uniform \
    --recompute_num_layers 1 \
    --train_iters "$TRAIN_ITERS" \
    --eval_iters 50 \
    --finetune true \
    --cross_entropy_loss_fusion true \
    --lr 1e-5 \
    --lr_warmup_iters 1 \
    --min_lr 1e-6 \
    --save "$OUTPUT" \
    --eval_interval 2 \
    --save_interval 2 \
    --max_length 512 \
    --num_workers 8 \
    --dataset_num_proc 1 \
    --no_save_optim true \
    --no_save_rng true \
    --sequence_parallel true \
    --use_flash_attn true

LAST=$(ls -d "$OUTPUT"/v*-*/checkpoint-* | sort -V | tail -1)
swiftray export --mcore_model "$LAST" --to_hf true --output_dir "$LAST-hf"
