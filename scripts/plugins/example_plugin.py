"""An --external_plugins file: three reward styles and an algorithm, registered by name.

    swiftray rlhf --rlhf_type grpo_rloo --external_plugins scripts/plugins/example_plugin.py \
        --reward_funcs solution_digits answer_length last_number_judge ...

Every dataset column reaches a reward as a keyword argument (here `solution`, from the built-in
arithmetic set), a list aligned with `completions`.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import torch

from swiftray.algorithms import register_algorithm
from swiftray.algorithms.grpo import GRPO
from swiftray.rewards import ORM, orms, register_reward


class SolutionDigits(ORM):
    """ms-swift's class style: partial credit, the share of the answer's digits the completion contains."""

    def __call__(self, completions: list[str], solution: list[str], **kwargs) -> list[float]:
        return [sum(d in text for d in answer) / len(answer) for text, answer in zip(completions, solution)]


orms["solution_digits"] = SolutionDigits  # ms-swift's way of registering a class


@register_reward("answer_length")
def answer_length(completions: list[str], solution: list[str], **kwargs) -> list[float]:
    """A plain function: a penalty for completions much longer than the answer needs."""
    return [-max(0, len(text) - 10 * len(answer)) / 100 for text, answer in zip(completions, solution)]


@register_reward("last_number_judge")
async def last_number_judge(completions: list[str], solution: list[str], **kwargs) -> list[float]:
    """An async function (say, a call to a judge service): 1 when the last number is the answer."""
    await asyncio.sleep(0)  # stands in for the network round trip

    def judge(text: str, answer: str) -> float:
        numbers = re.findall(r"-?\d+", text)
        return 1.0 if numbers and numbers[-1] == answer else 0.0

    return [judge(text, answer) for text, answer in zip(completions, solution)]


@register_algorithm("grpo_rloo")
@dataclass
class LeaveOneOutGRPO(GRPO):
    """GRPO with RLOO's baseline: each completion's reward minus the mean of the *other* completions
    of its prompt, unscaled (Ahmadian et al. 2024)."""

    def advantages(self, rewards: torch.Tensor, batch) -> torch.Tensor:
        g = self.num_generations
        groups = rewards.view(-1, g)
        others_mean = (groups.sum(dim=1, keepdim=True) - groups) / (g - 1)
        return (groups - others_mean).reshape(-1)
