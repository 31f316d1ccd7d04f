"""SFT: the degenerate case. One role (the policy), token cross-entropy on the labelled tokens."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from swiftray.algorithms.base import Algorithm, register_algorithm


@register_algorithm("sft")
@dataclass  # compared by value, as every algorithm in a RunPlan is
class SFT(Algorithm):
    data_source = "dataset"

    def loss(self, token_logprobs: torch.Tensor, batch: dict[str, Any],
             num_tokens_global: int) -> tuple[torch.Tensor, dict[str, float]]:
        # Sum over this micro-batch, divided by the step's token count over all
        # ranks: N workers then give exactly the loss of one worker on the
        # whole global batch.
        mask = batch["labels"][:, 1:] != -100
        loss = -(token_logprobs * mask).sum() / max(1, num_tokens_global)
        return loss, {}
