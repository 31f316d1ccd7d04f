"""What each non-policy role's actor is set up with: one frozen dataclass per role.

The run plan (swiftray/plan.py) builds these from the flags once; an actor's `setup(config)` takes
its own config and nothing else, never the argument namespace. This module imports neither Ray nor
torch, so that algorithms (which declare the roles they need) can build the configs too.
(The policy's config, PolicyConfig, lives beside PolicyActor.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class RolloutConfig:
    """A rollout engine: hf (transformers) or vllm."""

    model_dir: str
    engine: str = "hf"  # hf | vllm
    torch_dtype: str = "float32"
    quantization: str | None = None  # hf: "int8" decodes with int8 linear weights (CPU; --rollout_quantization)
    attn_impl: str | None = None
    seed: int = 42
    batch_size: int = 64  # hf: prompts decoded together
    vllm_gpu_memory_utilization: float = 0.9
    vllm_max_model_len: int | None = None
    vllm_tensor_parallel_size: int = 1
    vllm_enable_prefix_caching: bool = True
    sleep_level: int = 0  # 0 stays awake; 1 frees the KV cache while the policy trains; 2 the weights too
    # Each completion's token log-probs under the engine's own weights go with it (rollout correction).
    return_logprobs: bool = False
    # Colocated vLLM with tensor parallelism: the placement-group bundles (one per GPU) its workers use.
    bundle_indices: tuple[int, ...] = ()


@dataclass(frozen=True)
class ReferenceConfig:
    """The frozen reference model: it only scores completions."""

    model_dir: str
    adapters: tuple[str, ...] = ()
    torch_dtype: str | None = None  # None: the run's dtype (the plan fills it in)
    attn_impl: str | None = None
    batch_size: int = 16


@dataclass(frozen=True)
class RewardConfig:
    """The reward functions one run scores with (swiftray/rewards/)."""

    reward_funcs: tuple[str, ...] = ()
    reward_weights: tuple[float, ...] | None = None
    reward_kwargs: dict[str, Any] = field(default_factory=dict)  # settings the built-ins read
    external_plugins: tuple[str, ...] = ()  # files each reward actor imports itself
    # Rewards registered by code in the driver (a Python-API script): they travel pickled.
    registered: dict[str, Any] = field(default_factory=dict)
    # Seconds one reward function may take on a call; None: no limit (the functions then run in the
    # actor's own process, else in a child process that is ended when it hangs).
    timeout_s: float | None = None


@dataclass(frozen=True)
class RewardModelConfig:
    """A trained reward model (a sequence-classification head, e.g. an `--rlhf_type rm` checkpoint) that
    scores completions as one more reward, after the reward functions."""

    model_dir: str
    name: str  # its column in the reward metrics (rewards/NAME/mean)
    weight: float = 1.0
    torch_dtype: str | None = None  # None: the run's dtype (the plan fills it in)
    attn_impl: str | None = None
    batch_size: int = 16
    nonfinite_reward: str = "error"  # error | missing (counted as no reward), as for the reward functions


@dataclass(frozen=True)
class TeacherConfig:
    """GKD's frozen teacher: it writes its next-token log-probs at every completion token."""

    model_dir: str
    topk: int | None = None  # k most likely tokens per position (values and ids); None: the whole vocabulary
    torch_dtype: str | None = None  # None: the run's dtype (the plan fills it in)
    attn_impl: str | None = None
    batch_size: int = 16


def as_config(cls: type, config: Any) -> Any:
    """`config` as a `cls` instance: the plan hands dataclasses, tests and scripts may hand dicts."""
    if isinstance(config, cls):
        return config
    known = set(cls.__dataclass_fields__)
    unknown = sorted(set(config) - known)
    if unknown:
        raise ValueError(f"{cls.__name__}: unknown field(s) {unknown}; known: {sorted(known)}")
    return cls(**config)
