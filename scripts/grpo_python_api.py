"""GRPO from Python, no command line: a custom advantage and a reward defined in code, then training.

    python scripts/grpo_python_api.py                        # builds a tiny model, trains 4 steps
    python scripts/grpo_python_api.py --model MY_SFT_MODEL --max_steps 50

Flags after the script name are ordinary `swiftray rlhf` flags; they override the defaults below.
Rewards and algorithms registered here travel to the Ray actors with the run (pickled), so they
need no plug-in file.
"""

from __future__ import annotations

import re
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from swiftray.algorithms import register_algorithm
from swiftray.algorithms.grpo import GRPO
from swiftray.arguments import RlhfArguments
from swiftray.cli_parser import parse_args
from swiftray.controller import run_rlhf
from swiftray.rewards import register_reward


@register_reward("closeness")
def closeness(completions: list[str], solution: list[str], **kwargs) -> list[float]:
    """1 / (1 + |last number - answer|), 0 without a number; minus a little per character, so that
    short answers win ties. `solution` is a column of the dataset."""
    scores = []
    for text, answer in zip(completions, solution):
        numbers = re.findall(r"-?\d+", text)
        hit = 1.0 / (1.0 + abs(int(numbers[-1]) - int(answer))) if numbers else 0.0
        scores.append(hit - 0.001 * len(text))
    return scores


@register_algorithm("grpo_rank")
@dataclass
class RankGRPO(GRPO):
    """GRPO with rank advantages: within a prompt's group, completions get evenly spaced advantages in
    [-1, 1] by the rank of their reward (ties share their mean rank), whatever the reward's scale."""

    def advantages(self, rewards: torch.Tensor, batch) -> torch.Tensor:
        groups = rewards.view(-1, self.num_generations)
        below = (groups.unsqueeze(-1) > groups.unsqueeze(-2)).sum(-1).float()
        equal = (groups.unsqueeze(-1) == groups.unsqueeze(-2)).sum(-1).float()
        rank = below + (equal - 1) / 2  # 0 .. G-1
        return (2 * rank / (self.num_generations - 1) - 1).reshape(-1)


def main(argv: list[str] | None = None) -> Path:
    argv = list(sys.argv[1:] if argv is None else argv)
    defaults = ["--rlhf_type", "grpo_rank", "--reward_funcs", "closeness",
                "--dataset", "swiftray/arithmetic#200", "--train_type", "full", "--max_steps", "4",
                "--per_device_train_batch_size", "8", "--gradient_accumulation_steps", "1",
                "--num_generations", "4", "--max_completion_length", "32", "--beta", "0",
                "--learning_rate", "1e-5", "--logging_steps", "1", "--log_completions", "true",
                "--report_to", "none", "--output_dir", "output/grpo_python_api"]
    if "--model" not in argv:  # no model given: a tiny random one, enough to see the loop run
        from swiftray.models.tiny import make_tiny_model

        defaults += ["--model", str(make_tiny_model(Path(tempfile.mkdtemp()) / "tiny"))]
    args = parse_args(RlhfArguments, defaults + argv)  # a flag given twice: the later one wins
    run_dir = run_rlhf(args)
    print(f"run folder: {run_dir}")
    return run_dir


if __name__ == "__main__":
    main()
