#!/usr/bin/env bash
# Chat with the model that scripts/sft_self_cognition.sh trained: the infer command of ms-swift's
# Qwen3 guide with `swift` -> `swiftray`, on the last checkpoint under output/ (or the one given as
# $1). Type `who are you?`; `clear` forgets the conversation, `exit` leaves.
# MAX_NEW_TOKENS overrides the guide's 2048 (a barely trained tiny model may never stop on its own).
set -euo pipefail

CKPT=${1:-$(ls -d output/v*/checkpoint-* 2>/dev/null | sort -V | tail -n 1)}
if [ -z "$CKPT" ]; then
    echo "no checkpoint under output/: run scripts/sft_self_cognition.sh first" >&2
    exit 1
fi

CUDA_VISIBLE_DEVICES=0 \
swiftray infer \
    --adapters "$CKPT" \
    --stream true \
    --temperature 0 \
    --max_new_tokens "${MAX_NEW_TOKENS:-2048}"
