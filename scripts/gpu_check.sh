#!/usr/bin/env bash
# On a machine with one CUDA GPU: set up a GPU environment (.venv-gpu: CUDA torch, vLLM, swiftray),
# run every `gpu`-marked test, then a short colocated GRPO with vLLM on the tiny model at sleep levels
# 1 and 2 with offload, printing the GPU memory after each sleep/wake/offload/onload and the step time.
# Under 8 minutes once the packages are cached. Record what it prints in docs/gpu_runs.md.
set -euo pipefail
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv
VENV=${SWIFTRAY_GPU_VENV:-.venv-gpu}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/pip" install -q --upgrade pip
# vLLM first: it pins the CUDA torch it was built against; swiftray takes that torch.
"$VENV/bin/python" -c "import vllm" 2>/dev/null || "$VENV/bin/pip" install -q vllm
"$VENV/bin/pip" install -q -e ".[test]"
"$VENV/bin/pip" install -q numpy packaging einops
"$VENV/bin/pip" install -q --no-deps --ignore-requires-python megatron-core==0.19.2
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false SWIFTRAY_NO_PROGRESS=1 RAY_DEDUP_LOGS=0 RAY_ADDRESS=local
start=$(date +%s)
"$VENV/bin/python" -m pytest -q -p no:cacheprovider -m gpu -rs tests/ || status=$?
echo "gpu tests: exit ${status:-0}, $(( $(date +%s) - start )) s"

work=$(mktemp -d)
"$VENV/bin/swiftray" make-tiny-model --output_dir "$work/tiny" >/dev/null
for level in 1 2; do
  out="$work/grpo-sleep$level"
  t0=$(date +%s)
  "$VENV/bin/swiftray" rlhf --rlhf_type grpo --model "$work/tiny" --dataset 'swiftray/arithmetic#64' \
      --train_type full --max_steps 4 --per_device_train_batch_size 8 --gradient_accumulation_steps 1 \
      --num_generations 8 --max_completion_length 64 --logging_steps 1 --report_to none --save_strategy no \
      --reward_funcs accuracy format --use_vllm true --vllm_gpu_memory_utilization 0.3 \
      --sleep_level "$level" --offload_model true --offload_optimizer true --gc_collect_after_offload true \
      --output_dir "$out" >"$out.log" 2>&1 || { tail -40 "$out.log"; exit 1; }
  echo "== colocated GRPO, sleep_level $level: $(( $(date +%s) - t0 )) s in all"
  "$VENV/bin/python" - "$out" <<'PY'
import glob, json, sys
path = glob.glob(f"{sys.argv[1]}/v*/logging.jsonl")[0]
for line in map(json.loads, open(path)):
    if "train/loss" not in line:
        continue
    mem = {k.removeprefix("train/memory/").removesuffix("_gb"): round(v, 2) for k, v in line.items()
           if k.startswith("train/memory/")}
    step_s = sum(v for k, v in line.items() if k in ("train/time/generate_and_score_s", "train/time/train_s",
                                                          "train/time/sync_weights_s"))
    print(f"step {line['step']}: {step_s:.2f} s (generate+train+sync), reward {line['train/reward']:.3f}, "
          f"GPU GiB in use {mem}")
PY
done
echo "gpu_check: $(( $(date +%s) - start )) s after setup"
