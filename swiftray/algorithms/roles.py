"""The roles RL algorithms share, built from the flags: the reward functions, a reward model and the
reference model.

An algorithm's `from_args` calls these to declare what it needs (see base.RoleSpec); the run plan
places them and the controller starts them. Nothing here imports Ray.
"""

from __future__ import annotations

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
    weights = args.reward_weights[:len(args.reward_funcs)] if args.reward_weights is not None else None
    config = RewardConfig(
        reward_funcs=tuple(args.reward_funcs),
        reward_weights=tuple(weights) if weights is not None else None,
        reward_kwargs=reward_settings(args),
        external_plugins=tuple(absolute(p) for p in args.external_plugins),
        registered=driver_rewards(args.reward_funcs))
    return RoleSpec("reward", "swiftray.actors.reward:RewardActor", config, phases=("score",),
                    scale="one", wants_gpu=False, cpu_share=0.25)


def reference_role(args: Any) -> RoleSpec:
    """A frozen copy of the starting policy (or --ref_model) that scores the rollouts' tokens.
    Its dtype is left to the run plan, which gives every role the run's one dtype."""
    config = ReferenceConfig(model_dir=absolute(args.ref_model or args.model),
                             adapters=tuple(absolute(a) for a in args.adapters), attn_impl=args.attn_impl)
    return RoleSpec("reference", "swiftray.actors.reference:ReferenceActor", config, phases=("annotate",),
                    scale="per_gpu", wants_gpu=True, cpu_share=0.25)


def reward_model_role(args: Any) -> RoleSpec:
    """--reward_model: a frozen sequence-classification model on the policy's GPUs, scoring each
    prompt + completion after the reward functions (its weight is the last --reward_weights entry)."""
    weight = args.reward_weights[-1] if args.reward_weights is not None else 1.0
    config = RewardModelConfig(model_dir=absolute(args.reward_model), weight=weight, attn_impl=args.attn_impl,
                               batch_size=getattr(args, "local_rollout_forward_batch_size", 16))
    return RoleSpec("reward_model", "swiftray.actors.reward_model:RewardModelActor", config, phases=("score",),
                    scale="per_gpu", wants_gpu=True, cpu_share=0.25)


def reward_roles(args: Any) -> tuple[RoleSpec, ...]:
    """The reward sources of a run: the functions of --reward_funcs, then --reward_model when set."""
    if not getattr(args, "reward_model", None):
        return (reward_role(args),)
    return ((reward_role(args),) if args.reward_funcs else ()) + (reward_model_role(args),)
