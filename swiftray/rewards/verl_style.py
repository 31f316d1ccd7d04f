"""verl's reward functions as swiftray rewards.

A verl user's file defines `compute_score(data_source, solution_str, ground_truth, extra_info=None)`,
called once per completion and returning a float or a dict with a "score". Passed with
`--external_plugins my_reward.py --reward_funcs compute_score`, such a function is scored once per
completion with:

    data_source   the row's `data_source` column ("" when there is none)
    solution_str  the completion
    ground_truth  the row's `ground_truth` column, else `solution`, else verl's `reward_model["ground_truth"]`
    extra_info    the row's `extra_info` column (None when there is none), if the function takes it
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any


def is_verl_style(func: Any) -> bool:
    """True for a function with verl's compute_score parameters (not a class, not an ms-swift reward)."""
    if inspect.isclass(func) or not callable(func):
        return False
    try:
        names = set(inspect.signature(func).parameters)
    except (TypeError, ValueError):
        return False
    return {"solution_str", "ground_truth"} <= names and "completions" not in names


def _ground_truths(n: int, kwargs: dict[str, Any]) -> list[Any]:
    for column in ("ground_truth", "solution"):
        if kwargs.get(column) is not None:
            return list(kwargs[column])
    if kwargs.get("reward_model") is not None:
        return [(row or {}).get("ground_truth") for row in kwargs["reward_model"]]
    raise ValueError("a verl-style compute_score needs a ground truth: the dataset has no ground_truth, "
                     "solution or reward_model column")


def from_verl(compute_score: Callable[..., Any]) -> Callable[..., list[float]]:
    """A swiftray reward (completions + dataset columns -> one float per completion) around `compute_score`."""
    takes_extra = "extra_info" in inspect.signature(compute_score).parameters

    def reward(completions: list[str], **kwargs: Any) -> list[float]:
        n = len(completions)
        truths = _ground_truths(n, kwargs)
        sources = list(kwargs.get("data_source") or [""] * n)
        extras = list(kwargs.get("extra_info") or [None] * n)
        scores = []
        for completion, source, truth, extra in zip(completions, sources, truths, extras):
            call = {"data_source": source, "solution_str": completion, "ground_truth": truth}
            if takes_extra:
                call["extra_info"] = extra
            value = compute_score(**call)
            scores.append(value["score"] if isinstance(value, dict) else value)
        return scores

    reward.__name__ = getattr(compute_score, "__name__", "compute_score")
    return reward
