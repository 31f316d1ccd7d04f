#!/usr/bin/env bash
# Create .venv with swiftray and its test tools. On a machine without a GPU the
# CPU build of torch goes in first, so nothing pulls a multi-GB CUDA build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PY" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
if ! .venv/bin/python -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi >/dev/null 2>&1; then
    .venv/bin/pip install -q torch
  else
    # 2.13.0 is the CPU wheel this project is tested on; elsewhere take PyTorch's CPU index.
    .venv/bin/pip install -q torch==2.13.0 2>/dev/null \
      || .venv/bin/pip install -q torch --index-url https://download.pytorch.org/whl/cpu
  fi
fi
.venv/bin/pip install -q -e ".[test]"
# megatron-core for the Megatron policy backend (swiftray/megatron). Releases from 0.17 declare Python >= 3.12,
# yet 0.19.2's cp311 wheel works on 3.11; --no-deps stops pip building numpy from source, so its own
# dependencies (numpy, packaging, einops) go in first. Triton and TransformerEngine are GPU-only and not needed.
.venv/bin/pip install -q numpy packaging einops
.venv/bin/pip install -q --no-deps --ignore-requires-python "megatron-core==0.19.2"
echo "swiftray installed in .venv ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
