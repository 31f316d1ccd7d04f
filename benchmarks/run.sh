#!/usr/bin/env bash
# Benchmarks side by side: swiftray against TRL's SFTTrainer / GRPOTrainer and transformers' Trainer,
# on the same model, data and cores, and against the compute floor. One command:
#
#     bash benchmarks/run.sh [flags of benchmarks/main.py]
#
# 1. builds its own environment benchmarks/.env: torch 2.13.0 (the CPU wheel), TRL from PyPI
#    (1.16, which installs beside transformers < 5.20, swiftray's pin), py-spy, and swiftray
#    itself (pip install -e .); and benchmarks/.env-msswift for ms-swift 4.6.0, which pins
#    trl==0.29.1 and datasets<4.8.5 and so cannot share the first (--msswift 0 skips it).
# 2. runs benchmarks/main.py: SFT, GRPO, floors, generation, weight sync; each contender in its
#    own process, contenders alternating; about 25 minutes on a quiet 2-core machine.
# 3. writes benchmarks/RESULTS.md and benchmarks/results.png (raw: benchmarks/work/results.json).
#
# Useful flags: --only sft grpo floor generation sync, --sft_steps N --sft_repeats N,
# --grpo_steps K --grpo_repeats N, --sync_sizes 26M 100M 470M, --vllm 0, --report_only.
# Start from scratch: rm -rf benchmarks/work (the model, data and GRPO start are cached there).
set -euo pipefail
cd "$(dirname "$0")/.."
ENV=benchmarks/.env
if [ ! -x "$ENV/bin/python" ]; then
  python3 -m venv "$ENV"
fi
if ! "$ENV/bin/python" -c "import trl, swiftray, torch" 2>/dev/null; then
  "$ENV/bin/pip" install -q torch==2.13.0
  "$ENV/bin/pip" install -q -e . "transformers<5.20" "trl==1.16.0" py-spy psutil matplotlib
fi
MS_ENV=benchmarks/.env-msswift
if [[ " $* " != *" --msswift 0 "* ]] && ! "$MS_ENV/bin/python" -c "import swift, math_verify, msgspec" 2>/dev/null; then
  [ -x "$MS_ENV/bin/python" ] || python3 -m venv "$MS_ENV"
  "$MS_ENV/bin/pip" install -q torch==2.13.0
  # msgspec and math-verify: ms-swift's GRPO imports them, but its package does not require them
  "$MS_ENV/bin/pip" install -q "ms-swift==4.6.0" "transformers<5.20" msgspec math-verify psutil
fi
export TOKENIZERS_PARALLELISM=false SWIFTRAY_NO_PROGRESS=1
start=$(date +%s)
"$ENV/bin/python" benchmarks/main.py "$@"
echo "benchmarks took $(( $(date +%s) - start )) s; see benchmarks/RESULTS.md"
