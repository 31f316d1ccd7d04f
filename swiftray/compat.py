"""ms-swift flags that swiftray accepts but that change nothing here, each with the reason printed when
a user sets one; and flag values that swiftray refuses at parse time, saying what is supported.

Every other flag changes the run plan (tests/test_flags.py walks every field to prove it).
"""

from __future__ import annotations

import logging
from dataclasses import MISSING, fields
from typing import Any

from swiftray.arguments import ArgumentError

logger = logging.getLogger("swiftray")

# Accepted by every training command (sft, rlhf), no effect here.
TRAINING_COMPAT: dict[str, str] = {
    "dataloader_num_workers": "data is tokenised before training starts; --dataset_num_proc tokenises in parallel",
    "use_hf": "models and datasets are local folders and files here; no hub is contacted",
    "hub_token": "training uploads nothing; `swiftray export --push_to_hub` reads the token",
    "model_type": "the architecture comes from the model's config.json (a value that disagrees with it is refused)",
}
# Accepted by `swiftray rlhf` on top of TRAINING_COMPAT, no effect for RL algorithms.
RLHF_COMPAT: dict[str, str] = {
    "loss_scale": "RL losses cover every generated token; --loss_scale shapes SFT targets",
    "packing": "RL already lays each prompt's completions out with the prompt computed once (prompt sharing)",
    "padding_free": "RL already lays each prompt's completions out with the prompt computed once (prompt sharing)",
    "max_new_tokens": "RL generation length is --max_completion_length",
    "stream": "streams tokens in `swiftray infer`; RL generates in batches",
    "infer_backend": "RL picks its engine with --use_vllm",
    "per_device_eval_batch_size": "RL evaluation generates for every --val_dataset prompt in one round",
    "num_sample_generations": "swiftray logs sample completions with --log_completions and evaluates on --val_dataset",
}

# Accepted by `swiftray rlhf` on top of TRAINING_COMPAT, no effect for dataset-fed algorithms (DPO, KTO, ORPO,
# SimPO, CPO, RM); --loss_scale and --per_device_eval_batch_size do act on them.
RLHF_DATASET_COMPAT: dict[str, str] = {
    "packing": "preference pairs and KTO examples already compute each prompt once for their rows (prompt sharing)",
    "padding_free": "preference pairs and KTO examples already compute each prompt once for their rows (prompt "
                    "sharing)",
    "max_new_tokens": "preference learning generates nothing",
    "stream": "preference learning generates nothing",
    "infer_backend": "preference learning generates nothing",
}


# Flags whose only supported value is the default: any other value fails at parse time (refuse_unsupported).
REFUSED_FLAGS: dict[str, str] = {
    "streaming": "local datasets are loaded whole",
    "vllm_mode": "server mode is not built yet; colocate (the default) runs vLLM engines as Ray actors",
    "vllm_server_host": "only for --vllm_mode server",
    "vllm_server_port": "only for --vllm_mode server",
    "seq_kd": "ms-swift deprecated sequence-level KD on teacher generations and refuses it too; GKD trains on the "
              "student's samples (--lmbda) and the dataset's responses",
}


def compat_flags(command: str, rollouts: bool = True) -> dict[str, str]:
    """The flags of `command` that change nothing here, with their reasons; for `rlhf`, those of an
    algorithm that generates rollouts (GRPO) or, with rollouts=False, of a dataset-fed one (DPO)."""
    if command != "rlhf":
        return dict(TRAINING_COMPAT)
    return {**TRAINING_COMPAT, **(RLHF_COMPAT if rollouts else RLHF_DATASET_COMPAT)}


def _default(cls: type, name: str) -> Any:
    f = next(f for f in fields(cls) if f.name == name)
    return f.default if f.default is not MISSING else f.default_factory()  # type: ignore[misc]


def compat_notes(args: Any, command: str, rollouts: bool = True) -> list[str]:
    """One line per compatibility flag the user set to something other than its default."""
    return [f"--{name} has no effect here: {reason}" for name, reason in compat_flags(command, rollouts).items()
            if hasattr(args, name) and getattr(args, name) != _default(type(args), name)]


def refuse_unsupported(args: Any) -> None:
    """Values swiftray cannot honour yet: one line saying what is supported."""
    if getattr(args, "streaming", False):
        raise ArgumentError("--streaming true: not supported; local datasets are loaded whole (omit the flag)")
    if getattr(args, "vllm_mode", "colocate") == "server":
        raise ArgumentError("--vllm_mode server: not supported yet; the default, colocate, runs vLLM engines as "
                            "Ray actors of the run (on GPUs of their own when there are enough, else sharing "
                            "the policy's)")
    if getattr(args, "seq_kd", False):
        raise ArgumentError(f"--seq_kd true: not supported; {REFUSED_FLAGS['seq_kd']}")
    for name in ("vllm_server_host",):
        if getattr(args, name, None) is not None:
            raise ArgumentError(f"--{name}: only for --vllm_mode server, which is not supported yet")
    if hasattr(args, "vllm_server_port") and args.vllm_server_port != _default(type(args), "vllm_server_port"):
        raise ArgumentError("--vllm_server_port: only for --vllm_mode server, which is not supported yet")
