"""An --external_plugins file that adds an algorithm with a role of its own: a small learned value baseline.

    swiftray rlhf --rlhf_type grpo_value_baseline --external_plugins scripts/plugins/value_baseline.py ...

The algorithm declares a "baseline" role (algorithms/base.py RoleSpec): a Ray actor, defined below,
that predicts each prompt's expected reward from a hashed bag of its tokens. It takes part in two
phases of every step, with no change to swiftray's controller:

    annotate  it writes its prediction for each completion's prompt into the rollouts (`baseline`);
              the advantage is then reward - baseline, divided by the batch's std (REINFORCE with a
              learned baseline, instead of GRPO's group mean)
    train     beside the policy, on the same shards, it regresses its predictions on the rewards

Its weights are saved in each checkpoint (checkpoint-N/baseline/) and restored on resume.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from swiftray.actors.group import DistributedWorker
from swiftray.algorithms import register_algorithm
from swiftray.algorithms.base import RoleSpec
from swiftray.algorithms.grpo import GRPO
from swiftray.rewards import register_reward

BUCKETS = 512  # hashed token features


def prompt_features(prompt_ids: list[int]) -> torch.Tensor:
    """A normalised bag of the prompt's tokens, hashed into BUCKETS features."""
    x = torch.zeros(BUCKETS)
    for token in prompt_ids:
        x[token % BUCKETS] += 1.0
    return x / max(1, len(prompt_ids))


class BaselineActor(DistributedWorker):
    """The baseline role: a linear value model over prompt features, trained by SGD."""

    def setup(self, config: dict) -> None:
        torch.manual_seed(config.get("seed", 0))
        self.weights = torch.zeros(BUCKETS, requires_grad=True)
        self.bias = torch.zeros(1, requires_grad=True)
        self.optimizer = torch.optim.SGD([self.weights, self.bias], lr=config.get("learning_rate", 0.5))

    def predict(self, prompts: list[list[int]]) -> torch.Tensor:
        features = torch.stack([prompt_features(p) for p in prompts])
        return features @ self.weights + self.bias

    def annotate(self, batch: Any) -> Any:
        """The rollouts with `baseline`: the predicted reward of each completion's prompt."""
        with torch.no_grad():
            batch.columns["baseline"] = self.predict(batch.prompt_ids).tolist()
        return batch

    def train_step(self, micro_batches: list, loss_fn: Any) -> dict[str, float]:
        import ray

        batches = [ray.get(b) if isinstance(b, ray.ObjectRef) else b for b in
                   (ray.get(micro_batches) if isinstance(micro_batches, ray.ObjectRef) else micro_batches)]
        self.optimizer.zero_grad()
        total, metrics = 0.0, {}
        for batch in batches:
            prompts = [row[:int(n)].tolist() for row, n in zip(batch["input_ids"], batch["prompt_lens"])]
            loss, metrics = loss_fn(self.predict(prompts), batch)
            (loss / len(batches)).backward()
            total += loss.item() / len(batches)
        self.optimizer.step()
        return {"loss": total, **metrics}

    def save_checkpoint(self, path: str, save_only_model: bool = False) -> str:
        os.makedirs(path, exist_ok=True)
        save_file({"weights": self.weights.detach(), "bias": self.bias.detach()},
                  os.path.join(path, "baseline.safetensors"))
        return path

    def load_checkpoint(self, path: str) -> int:
        state = load_file(os.path.join(path, "baseline.safetensors"))
        with torch.no_grad():
            self.weights.copy_(state["weights"])
            self.bias.copy_(state["bias"])
        return 0


def baseline_loss(predictions: torch.Tensor, batch: dict) -> tuple[torch.Tensor, dict[str, float]]:
    """Squared error of the predicted reward against the reward each completion got."""
    error = predictions - batch["rewards"]
    return (error ** 2).mean(), {"abs_error": float(error.detach().abs().mean())}


@register_reward("completion_chars")
def completion_chars(completions: list[str], **kwargs: Any) -> list[float]:
    """A reward that differs between completions even from an untrained model: the text's length / 50."""
    return [len(c) / 50.0 for c in completions]


@register_algorithm("grpo_value_baseline")
@dataclass
class ValueBaselineGRPO(GRPO):
    @classmethod
    def from_args(cls, args: Any) -> ValueBaselineGRPO:
        algo = super().from_args(args)
        baseline = RoleSpec("baseline", f"{__name__}:BaselineActor", {"seed": args.seed, "learning_rate": 0.5},
                            phases=("annotate", "train"), scale="per_rank", wants_gpu=False, cpu_share=0.25)
        algo.role_specs = (*algo.role_specs, baseline)
        return algo

    def advantages(self, rewards: torch.Tensor, batch: Any) -> torch.Tensor:
        centred = rewards - torch.tensor(batch.columns["baseline"], dtype=rewards.dtype)
        return centred / (centred.std() + 1e-4) if len(centred) > 1 else centred

    def make_experience(self, batch: Any, pad_token_id: int) -> dict[str, torch.Tensor]:
        rows = super().make_experience(batch, pad_token_id)
        rows["rewards"] = torch.tensor(batch.rewards, dtype=torch.float32)  # the baseline's regression target
        return rows

    def role_loss(self, role: str) -> Any:
        return baseline_loss
