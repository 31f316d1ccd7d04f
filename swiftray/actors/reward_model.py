"""RewardModelActor: a trained reward model (`--reward_model DIR`) scoring rollouts as one more reward.

A role of its own in the "score" phase, after the reward functions' actor: it scores each completion
with its prompt (the token ids the policy saw, so the reward model must share the policy's tokenizer;
the role checks it), writes the scores under its name beside the functions' values, and adds
weight x score to each completion's total reward (ms-swift: reward models come after the reward
functions in --reward_weights). The score of a row is the head at its last token
(`models/reward_model.py`), as when the model was trained (`--rlhf_type rm`): there, a completion ends
at its end-of-turn token, as a generated one that stopped does.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch

from swiftray.actors.configs import RewardModelConfig, as_config
from swiftray.actors.group import DistributedWorker
from swiftray.experience import RolloutBatch, sequences_batch
from swiftray.models.reward_model import load_reward_model, reward_scores


class RewardModelActor(DistributedWorker):
    def setup(self, config: RewardModelConfig | dict[str, Any]) -> None:
        """Load the reward model of `config` (a RewardModelConfig; a dict of its fields works too)."""
        self.cfg = as_config(RewardModelConfig, config)
        self.model = load_reward_model(self.cfg.model_dir, torch_dtype=self.cfg.torch_dtype or "float32",
                                       attn_impl=self.cfg.attn_impl)
        self.model.requires_grad_(False)
        if torch.cuda.is_available():
            self.model.to("cuda")
        self.model.eval()

    @torch.no_grad()
    def score(self, batch: RolloutBatch) -> list[float]:
        """The model's score of each prompt + completion."""
        device = next(self.model.parameters()).device
        pad = self.model.config.pad_token_id
        out: list[float] = []
        for start in range(0, len(batch), self.cfg.batch_size):
            end = start + self.cfg.batch_size
            rows = sequences_batch(batch.prompt_ids[start:end], batch.completion_ids[start:end], pad)
            out += reward_scores(self.model, rows["input_ids"].to(device), rows["attention_mask"].to(device)).tolist()
        return out

    def annotate(self, batch: RolloutBatch) -> RolloutBatch:
        """The same batch with this model's scores in `reward_per_func[name]`, added (weighted) to `rewards`."""
        start = time.time()
        scores: list[float | None] = list(self.score(batch))
        for i, value in enumerate(scores):
            if math.isfinite(value):
                continue
            if self.cfg.nonfinite_reward == "error":
                raise ValueError(f"reward model {self.cfg.name} ({self.cfg.model_dir}) scored completion {i} "
                                 f"{batch.completions[i][:80]!r} as {value}; use --nonfinite_reward missing to count "
                                 "such scores as no reward")
            scores[i] = None
        totals = batch.rewards or [0.0] * len(batch)
        batch.rewards = [t + (self.cfg.weight * s if s is not None else 0.0) for t, s in zip(totals, scores)]
        batch.reward_per_func[self.cfg.name] = scores
        batch.timings[f"{self.cfg.name}_s"] = time.time() - start
        return batch
