"""The RL driver's small helpers: prompt encoding and order, reward settings, hardware warnings."""

from __future__ import annotations

import logging
import random
from typing import Any

from datasets import Dataset

from swiftray.data.template import SampleTooLongError, Template

logger = logging.getLogger("swiftray")


def encode_prompts(ds: Dataset, template: Template) -> list[dict[str, Any]]:
    """Each row's prompt token ids (the conversation up to the last user turn) plus its other columns.

    Prompts over --max_length are skipped with a logged count (--truncation_strategy delete).
    """
    rows, too_long = [], 0
    for row in ds:
        messages = list(row["messages"])
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]  # GRPO generates the last answer itself
        try:
            prompt_ids = template.encode_prompt(messages)
        except SampleTooLongError:
            too_long += 1
            continue
        rows.append({**row, "messages": messages, "prompt_ids": prompt_ids})
    if too_long:
        logger.warning("skipped %d of %d prompts longer than --max_length %s", too_long, len(ds),
                       template.max_length)
    return rows


class PromptSampler:
    """Indices in a per-epoch shuffled order (seed + epoch), resumable from (epoch, position)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size == 0:
            raise ValueError("no prompts in the training data")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._make_order()
            n = min(k - len(out), self.size - self.position)
            out += self._order[self.position:self.position + n]
            self.position += n
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._make_order()


def reward_kwargs(args: Any) -> dict[str, Any]:
    """Settings the built-in rewards read (cosine, repetition, soft_overlong)."""
    names = ("max_completion_length", "soft_max_length", "soft_cache_length", "cosine_min_len_value_wrong",
             "cosine_max_len_value_wrong", "cosine_min_len_value_correct", "cosine_max_len_value_correct",
             "cosine_max_len", "repetition_n_grams", "repetition_max_penalty")
    out = {name: getattr(args, name) for name in names}
    out["soft_max_length"] = out["soft_max_length"] or args.max_completion_length
    out["cosine_max_len"] = out["cosine_max_len"] or args.max_completion_length
    return out


def driver_rewards(names: list[str]) -> dict[str, Any]:
    """Rewards registered by code in this process (a Python-API script), to ship to the reward actors.

    Built-ins exist in every process, and plug-in files are imported by each actor itself; a
    function or class registered in the user's script exists only here, so it travels pickled.
    """
    from swiftray.rewards import REWARD_FUNCS
    from swiftray.rewards.builtin import BUILTIN_REWARDS

    out = {}
    for name in names:
        obj = REWARD_FUNCS.get(name)
        if obj is None or BUILTIN_REWARDS.get(name) is obj:
            continue
        if getattr(obj, "__module__", "").startswith("swiftray_plugin_"):  # see load_external_plugins
            continue
        out[name] = obj
    return out


def ship_plugins_by_value() -> None:
    """Let what plug-in files define (an algorithm class, say) travel to other processes.

    load_external_plugins imports each file under a generated module name that no other process
    has, so pickling its classes by reference fails there; by value, they arrive whole.
    """
    import sys

    from ray import cloudpickle

    for name, module in list(sys.modules.items()):
        if name.startswith("swiftray_plugin_"):  # the names load_external_plugins gives
            cloudpickle.register_pickle_by_value(module)


def readable_error(err: BaseException) -> BaseException:
    """The exception an actor or task raised, out of Ray's RayTaskError wrapping (which repeats the
    remote traceback in its message). The wrapping stays attached as __cause__ for debugging."""
    import ray

    cause = err
    while isinstance(cause, ray.exceptions.RayTaskError) and isinstance(getattr(cause, "cause", None),
                                                                         BaseException):
        cause = cause.cause
    return cause


def hardware_warnings(args: Any) -> list[str]:
    """Flags that only mean something on GPUs, explained once when there are none."""
    import torch

    if torch.cuda.is_available():
        return []
    notes = []
    if args.use_vllm:
        try:
            import vllm  # noqa: F401
        except ImportError:
            notes.append("--use_vllm true: vLLM is not installed here (GPU: pip install 'swiftray[vllm]'; "
                         "CPU: scripts/setup_vllm_cpu.sh); generating with the hf engine instead")
            args.use_vllm = False
    gpu_only = [f for f in ("offload_model", "offload_optimizer", "gc_collect_after_offload") if getattr(args, f)]
    if args.sleep_level:
        gpu_only.append(f"sleep_level={args.sleep_level}")
    if args.vllm_gpu_memory_utilization != 0.9:
        gpu_only.append("vllm_gpu_memory_utilization")
    if gpu_only:
        notes.append(f"no GPU: {', '.join(gpu_only)} only free GPU memory; accepted and ignored on CPU")
    return notes
