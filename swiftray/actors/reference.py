"""ReferenceActor: a frozen copy of the starting policy; it only scores completions (log-probs for the KL term)."""

from __future__ import annotations

import time
from typing import Any

import torch

from swiftray.actors.configs import ReferenceConfig, as_config
from swiftray.actors.group import DistributedWorker
from swiftray.experience import RolloutBatch
from swiftray.models.inference import load_inference_model
from swiftray.models.logprobs import completion_logprobs


class ReferenceActor(DistributedWorker):
    def setup(self, config: ReferenceConfig | dict[str, Any]) -> None:
        """Load the frozen model of `config` (a ReferenceConfig; a dict of its fields works too)."""
        cfg = as_config(ReferenceConfig, config)
        self.model, self.tokenizer = load_inference_model(cfg.model_dir, list(cfg.adapters),
                                                          torch_dtype=cfg.torch_dtype, merge=True,
                                                          attn_impl=cfg.attn_impl)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.batch_size = cfg.batch_size

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> list[list[float]]:
        """Reference log-prob of each completion token of each completion."""
        return completion_logprobs(self.model, batch.prompt_ids, batch.completion_ids,
                                   self.tokenizer.pad_token_id, self.batch_size)

    def annotate(self, batch: RolloutBatch) -> RolloutBatch:
        """The same batch with `ref_logprobs` filled in."""
        start = time.time()
        batch.ref_logprobs = self.logprobs(batch)
        batch.timings["reference_s"] = time.time() - start
        return batch
