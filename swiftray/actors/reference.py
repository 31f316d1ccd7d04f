"""ReferenceActor: a frozen copy of the starting policy; it only scores completions.

Two callers: the RL loop hands it RolloutBatches (`annotate`: per-token log-probs for GRPO's KL term);
the dataset loop hands it a rank's micro-batches of rows (`annotate_rows`: each row's completion
log-prob, `ref_logps` [B], for DPO and KTO), computed as the policy computes its own (the labelled
tokens, rows that share a prompt computing it once).
"""

from __future__ import annotations

import time
from typing import Any

import torch

from swiftray.actors.configs import ReferenceConfig, as_config
from swiftray.actors.group import DistributedWorker
from swiftray.experience import RolloutBatch
from swiftray.models.inference import load_inference_model
from swiftray.models.logprobs import completion_logprobs
from swiftray.models.prompt_sharing import shared_forward


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
        self.num_params = sum(p.numel() for p in self.model.parameters())

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

    @torch.no_grad()
    def sequence_logps(self, micro_batches: list[dict[str, Any]]) -> list[torch.Tensor]:
        """Each row's summed log-prob of its labelled tokens, [B] per micro-batch (float32, on CPU)."""
        from swiftray.models.token_stats import token_logprobs

        device = next(self.model.parameters()).device
        out = []
        for micro in micro_batches:
            batch = {k: v.to(device) for k, v in micro.items() if isinstance(v, torch.Tensor)}
            logits = shared_forward(lambda inputs: self.model(**inputs).logits, batch, self.model, self.num_params)
            if logits is None:
                logits = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            logprobs, _mask, _correct = token_logprobs(logits, batch["labels"])
            out.append(logprobs.sum(-1).cpu())
        return out

    def annotate_rows(self, micro_batches: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """The same micro-batches with `ref_logps` [B] (passed on, actor to actor, to the policy)."""
        return [{**micro, "ref_logps": logps}
                for micro, logps in zip(micro_batches, self.sequence_logps(micro_batches))]
