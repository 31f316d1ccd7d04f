"""The arithmetic floor: a GRPO step's FLOPs over this CPU's measured matrix-multiply rate.

    python benchmarks/flops.py --threads 2    # prints RESULT {"matmul_gflops": {...}}

FLOPs count only useful work (real tokens, no padding): matmuls of every linear layer and the
LM head (2 FLOPs per multiply-add), attention scores and values, x3 for forward + backward.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import emit, median  # noqa: E402

# (M, K, N) shapes of the benchmark model's matmuls: a training batch's rows (~1500 tokens) and a
# decode step's rows (8 sequences), against the MLP's weights; plus a large square one.
SHAPES = {"train_mlp": (1536, 512, 1536), "decode_mlp": (8, 512, 1536), "square_1024": (1024, 1024, 1024)}


def matmul_gflops(threads: int, seconds: float = 1.0) -> dict[str, float]:
    """Sustained fp32 GFLOP/s of torch.mm at each shape (median of 5 timed bursts)."""
    import torch

    torch.set_num_threads(threads)
    out = {}
    for name, (m, k, n) in SHAPES.items():
        # Enough distinct weights that the decode shape streams from memory as in a real model.
        copies = max(1, (64 << 20) // (k * n * 4)) if m < 64 else 1
        a = torch.randn(m, k)
        bs = [torch.randn(k, n) for _ in range(copies)]
        for b in bs:
            a @ b
        rates = []
        for _ in range(5):
            calls, start = 0, time.perf_counter()
            while time.perf_counter() - start < seconds / 5:
                a @ bs[calls % copies]
                calls += 1
            rates.append(2 * m * k * n * calls / (time.perf_counter() - start) / 1e9)
        out[name] = median(rates)
    return out


def model_dims(config: dict[str, Any]) -> dict[str, int]:
    h, layers = config["hidden_size"], config["num_hidden_layers"]
    q = config["num_attention_heads"] * config["head_dim"]
    kv = config["num_key_value_heads"] * config["head_dim"]
    linear = layers * (h * q + 2 * h * kv + q * h + 3 * h * config["intermediate_size"])
    return {"linear_params": linear, "lm_head_params": h * config["vocab_size"], "layers": layers, "q_dim": q}


def forward_flops(dims: dict[str, int], seq_len: int) -> float:
    """Forward FLOPs of one sequence of `seq_len` tokens."""
    matmul = 2 * (dims["linear_params"] + dims["lm_head_params"]) * seq_len
    # Causal attention: position t attends t + 1 keys; QK^T and AV each 2 * q_dim FLOPs per key.
    keys = seq_len * (seq_len + 1) // 2
    return matmul + 4 * dims["q_dim"] * dims["layers"] * keys


def grpo_step_flops(config: dict[str, Any], prompt_len: int, completion_lens: list[int]) -> dict[str, float]:
    """One GRPO step: generate, reference forward, policy forward + backward (x3), AdamW."""
    dims = model_dims(config)
    # Generation runs the prompt and every new token through the model once per completion.
    generate = sum(forward_flops(dims, prompt_len + c) for c in completion_lens)
    full = sum(forward_flops(dims, prompt_len + c) for c in completion_lens)
    params = dims["linear_params"] + dims["lm_head_params"]
    return {"generate": generate, "reference": full, "train": 3 * full, "adamw": 12 * params,
            "total": generate + 4 * full + 12 * params}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seconds", type=float, default=1.5)
    opts = p.parse_args()
    emit({"matmul_gflops": matmul_gflops(opts.threads, opts.seconds), "threads": opts.threads})


if __name__ == "__main__":
    main()
