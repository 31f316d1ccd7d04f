#!/usr/bin/env bash
# The demo: set up .venv, then tiny model -> SFT -> GRPO on the built-in arithmetic set,
# printing held-out greedy accuracy before and after GRPO. Extra flags go to scripts/demo.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export TOKENIZERS_PARALLELISM=false
.venv/bin/python scripts/demo.py "$@"
