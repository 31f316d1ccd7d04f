"""RewardModelActor: a frozen reward model (--reward_model) that scores each prompt + completion.

It runs in the score phase after the reward functions (if any): its score becomes one more column of
`reward_per_func` and is added, times its weight, to each completion's reward. The score is
transformers' own (models/reward_model.py): the head at each row's last token that is not padding.
"""

from __future__ import annotations

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
        from transformers import AutoTokenizer

        self.cfg = as_config(RewardModelConfig, config)
        tokenizer = AutoTokenizer.from_pretrained(self.cfg.model_dir)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.model = load_reward_model(self.cfg.model_dir, torch_dtype=self.cfg.torch_dtype or "float32",
                                       attn_impl=self.cfg.attn_impl, pad_token_id=pad)
        self.model.requires_grad_(False).eval()
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        self.model.to(self.device)
        self.pad_token_id = self.model.config.pad_token_id

    @torch.no_grad()
    def scores(self, batch: RolloutBatch) -> list[float]:
        """One score per completion (float32), batch_size rows per forward."""
        out: list[float] = []
        size = self.cfg.batch_size
        for start in range(0, len(batch), size):
            rows = sequences_batch(batch.prompt_ids[start:start + size], batch.completion_ids[start:start + size],
                                   self.pad_token_id)
            out += reward_scores(self.model, rows["input_ids"].to(self.device),
                                 rows["attention_mask"].to(self.device)).cpu().tolist()
        return out

    def annotate(self, batch: RolloutBatch) -> RolloutBatch:
        """The batch with the model's score in reward_per_func[name] and weight x score added to rewards."""
        start = time.time()
        scores = self.scores(batch)
        if any(s != s or s in (float("inf"), float("-inf")) for s in scores):
            raise ValueError(f"reward model {self.cfg.model_dir}: a score is not finite ({scores})")
        base = batch.rewards or [0.0] * len(batch)
        batch.rewards = [r + self.cfg.weight * s for r, s in zip(base, scores)]
        batch.reward_per_func[self.cfg.name] = scores
        batch.timings["reward_model_s"] = time.time() - start
        return batch
