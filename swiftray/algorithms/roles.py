"""The roles algorithms share, built from the flags: the reward functions, reward models and the reference.

An algorithm's `from_args` calls these to declare what it needs (see base.RoleSpec); the run plan
places them and the controller starts them. Nothing here imports Ray.
"""

from __future__ import annotations

import os
from typing import Any

from swiftray.actors.configs import ReferenceConfig, RewardConfig, RewardModelConfig
from swiftray.algorithms.base import RoleSpec
from swiftray.paths import absolute

REWARD_SETTINGS = ("nonfinite_reward", "max_completion_length", "soft_max_length", "soft_cache_length", "cosine_min_len_value_wrong",
                   "cosine_max_len_value_wrong", "cosine_min_len_value_correct", "cosine_max_len_value_correct",
                   "cosine_max_len", "repetition_n_grams", "repetition_max_penalty")


def reward_settings(args: Any) -> dict[str, Any]:
    """Settings the built-in rewards read (cosine, repetition, soft_overlong), with their derived defaults."""
    out = {name: getattr(args, name) for name in REWARD_SETTINGS}
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


def reward_role(args: Any) -> RoleSpec:
    """The reward functions of --reward_funcs, on a CPU actor of their own (math-verify needs a main thread)."""
    from swiftray.arguments import ArgumentError
    from swiftray.rewards import REWARD_FUNCS

    unknown = [name for name in args.reward_funcs if name not in REWARD_FUNCS]
    if unknown:
        raise ArgumentError(f"--reward_funcs {' '.join(unknown)}: unknown reward function(s); registered: "
                            f"{', '.join(sorted(REWARD_FUNCS))} (add your own with --external_plugins)")
    config = RewardConfig(
        reward_funcs=tuple(args.reward_funcs),
        # --reward_weights lists the functions' weights first, then the reward models' (reward_model_roles).
        reward_weights=tuple(args.reward_weights[:len(args.reward_funcs)]) if args.reward_weights is not None else None,
        reward_kwargs=reward_settings(args),
        external_plugins=tuple(absolute(p) for p in args.external_plugins),
        registered=driver_rewards(args.reward_funcs), timeout_s=getattr(args, "reward_timeout", None))
    return RoleSpec("reward", "swiftray.actors.reward:RewardActor", config, phases=("score",),
                    scale="one", wants_gpu=False, cpu_share=0.25)


def reference_role(args: Any) -> RoleSpec:
    """A frozen copy of the starting policy (or --ref_model, with --ref_adapters) that scores the rollouts'
    tokens (RL) or each step's rows (DPO, KTO). Without --ref_adapters it loads --adapters, so that it is
    the policy as training starts. Its dtype is left to the run plan, which gives every role the run's one
    dtype."""
    adapters = getattr(args, "ref_adapters", None) or args.adapters
    config = ReferenceConfig(model_dir=absolute(args.ref_model or args.model),
                             adapters=tuple(absolute(a) for a in adapters), attn_impl=args.attn_impl)
    return RoleSpec("reference", "swiftray.actors.reference:ReferenceActor", config, phases=("annotate",),
                    scale="per_gpu", wants_gpu=True, cpu_share=0.25)


def reward_model_roles(args: Any) -> tuple[RoleSpec, ...]:
    """One scoring role per --reward_model folder, after the reward functions (phase "score", in declared
    order): its weight is the one --reward_weights lists after the functions' (ms-swift's order)."""
    from swiftray.arguments import ArgumentError

    models = list(getattr(args, "reward_model", None) or [])
    weights = list(args.reward_weights) if args.reward_weights is not None else None
    specs, names = [], []
    for i, path in enumerate(models):
        if not any(os.path.isfile(os.path.join(path, f)) for f in ("config.json", "adapter_config.json")):
            raise ArgumentError(f"--reward_model {path}: no config.json or adapter_config.json there (expected a "
                                "model or LoRA folder, e.g. an --rlhf_type rm checkpoint)")
        if args.model and not _same_vocabulary(args.model, path):
            raise ArgumentError(f"--reward_model {path}: its tokenizer differs from --model {args.model}'s; it scores "
                                "the policy's token ids, so it must share the policy's tokenizer")
        name = os.path.basename(os.path.normpath(path))
        while name in names or name in args.reward_funcs:  # two folders of one name stay apart in the metrics
            name += "_"
        names.append(name)
        weight = weights[len(args.reward_funcs) + i] if weights is not None else 1.0
        config = RewardModelConfig(model_dir=absolute(path), name=name, weight=float(weight),
                                   attn_impl=args.attn_impl, nonfinite_reward=args.nonfinite_reward,
                                   batch_size=getattr(args, "local_rollout_forward_batch_size", 16))
        specs.append(RoleSpec("reward_model" if i == 0 else f"reward_model_{i}",
                              "swiftray.actors.reward_model:RewardModelActor", config, phases=("score",),
                              scale="per_gpu", wants_gpu=True, cpu_share=0.25))
    return tuple(specs)


def _same_vocabulary(model_dir: str, other_dir: str) -> bool:
    """Whether two model folders' tokenizers map the same strings to the same ids."""
    from transformers import AutoTokenizer

    if not os.path.isdir(model_dir):
        return True  # nothing to compare with (planning for another machine); the run itself loads both
    return AutoTokenizer.from_pretrained(model_dir).get_vocab() == AutoTokenizer.from_pretrained(other_dir).get_vocab()


def reward_roles(args: Any) -> tuple[RoleSpec, ...]:
    """The reward sources of a run: the functions of --reward_funcs (when named, or when there is no
    reward model), then one role per --reward_model."""
    models = reward_model_roles(args)
    return ((reward_role(args),) if args.reward_funcs or not models else ()) + models
