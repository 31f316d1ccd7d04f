"""TeacherActor: GKD's frozen teacher. It reads the student's rollouts and writes, at every completion
token, its next-token log-probs (temperature 1): the whole vocabulary, or its top k (values and ids).

What crosses the object store is therefore per completion token, never per position of the padded
batch: [L, V] float32 for the whole vocabulary (V = 2000 for the tiny model: 8 KB a token; 600 KB a
token for a 150k vocabulary, which is what --gkd_logits_topk is for), or [L, k] float32 values and
[L, k] int32 ids (k = 64: 512 bytes a token). The student turns them back into its loss's inputs.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from swiftray.actors.configs import TeacherConfig, as_config
from swiftray.actors.group import DistributedWorker
from swiftray.experience import RolloutBatch, sequences_batch
from swiftray.models.inference import load_inference_model


class TeacherActor(DistributedWorker):
    def setup(self, config: TeacherConfig | dict[str, Any]) -> None:
        """Load the frozen teacher of `config` (a TeacherConfig; a dict of its fields works too)."""
        self.cfg = as_config(TeacherConfig, config)
        self.model, self.tokenizer = load_inference_model(self.cfg.model_dir, [], torch_dtype=self.cfg.torch_dtype,
                                                          attn_impl=self.cfg.attn_impl)
        self.model.requires_grad_(False)

    @torch.no_grad()
    def token_logprobs(self, batch: RolloutBatch) -> tuple[list[torch.Tensor], list[torch.Tensor] | None]:
        """Per completion: its tokens' next-token log-probs [L, V] (or top-k values [L, k]), and with top-k
        the token ids [L, k] (int32)."""
        device = next(self.model.parameters()).device
        values, indices = [], [] if self.cfg.topk else None
        size = self.cfg.batch_size
        for start in range(0, len(batch), size):
            prompts, completions = batch.prompt_ids[start:start + size], batch.completion_ids[start:start + size]
            rows = sequences_batch(prompts, completions, self.tokenizer.pad_token_id or 0)
            logits = self.model(input_ids=rows["input_ids"].to(device),
                                attention_mask=rows["attention_mask"].to(device)).logits
            for i, (p, c) in enumerate(zip(prompts, completions)):
                # Position P-1+t predicts completion token t.
                logprobs = torch.log_softmax(logits[i, len(p) - 1:len(p) - 1 + len(c)].float(), dim=-1)
                if self.cfg.topk:
                    top = torch.topk(logprobs, min(self.cfg.topk, logprobs.shape[-1]), dim=-1)
                    values.append(top.values.cpu())
                    indices.append(top.indices.to(torch.int32).cpu())
                else:
                    values.append(logprobs.cpu())
        return values, indices

    def annotate(self, batch: RolloutBatch) -> RolloutBatch:
        """The batch with annotations["teacher_logprobs"] (and ["teacher_token_ids"] with top-k)."""
        start = time.time()
        values, indices = self.token_logprobs(batch)
        batch.annotations["teacher_logprobs"] = values
        if indices is not None:
            batch.annotations["teacher_token_ids"] = indices
        batch.timings["teacher_s"] = time.time() - start
        return batch
