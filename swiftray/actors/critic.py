"""CriticActor: one rank of PPO's critic, a value model trained beside the policy.

It is the policy actor with another model: the same backends (DDP, FSDP2, DeepSpeed ZeRO), optimizer,
LR schedule, non-finite guard and checkpoints (weights as safetensors, training state keyed by name),
built from the policy's training settings (the run plan derives its PolicyConfig from the policy's,
with `model_dir` the value model's folder). The model is `models/value_model.py`'s: one value per
position. What differs is what a forward returns:

    values[b, j]   the value of the state after token j (j = 0 .. W-1: every position, [B, W])

so that a completion whose prompt has P tokens and which has L tokens has its values at
columns P-1 .. P+L-1: the state before each of its tokens, then the state after its last one.

    annotate(batch)                        collective; this rank's slice of the rollouts with
                                           annotations["values"]: L + 1 values per completion
    train_step(micro_batches, loss_fn)     loss_fn(values [B, W], batch, num_tokens_global)

The critic never knows the value loss: the algorithm hands it in (ppo.py, ppo_math.py).
"""

from __future__ import annotations

from typing import Any

import torch

from swiftray.actors.policy import MODEL_INPUTS, PolicyActor, PolicyConfig
from swiftray.experience import RolloutBatch, sequences_batch
from swiftray.models.value_model import load_value_model


class CriticActor(PolicyActor):
    def _load_module(self, cfg: PolicyConfig) -> torch.nn.Module:
        return load_value_model(cfg.model_dir, torch_dtype=cfg.torch_dtype, attn_impl=cfg.attn_impl,
                                gradient_checkpointing=cfg.gradient_checkpointing, train_type=cfg.train_type,
                                lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
                                target_modules=cfg.target_modules, seed=cfg.seed)

    def _forward(self, batch: dict, with_entropy: bool = False, with_logits: bool = False
                 ) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        """(batch on the device, values [B, W] in float32, the label mask, 0 correct tokens)."""
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        values = self.backend.forward({k: batch[k] for k in MODEL_INPUTS if k in batch})[..., 0].float()
        labels = batch.get("labels")
        mask = (labels[:, 1:] != -100) if labels is not None else torch.ones_like(values[:, 1:], dtype=torch.bool)
        return batch, values, mask, torch.zeros((), dtype=torch.long)

    @torch.no_grad()
    def values(self, batch: RolloutBatch) -> list[list[float]]:
        """Each completion's L + 1 values: the state before each of its tokens, then after its last."""
        self.backend.train(False)
        size, out = self.cfg.forward_batch_size, []
        for start in range(0, len(batch), size):
            prompts, completions = batch.prompt_ids[start:start + size], batch.completion_ids[start:start + size]
            values = self._forward(sequences_batch(prompts, completions, pad_token_id=0))[1].cpu()
            out += [values[i, len(p) - 1:len(p) + len(c)].tolist() for i, (p, c) in enumerate(zip(prompts, completions))]
        return out

    def annotate(self, batch: RolloutBatch) -> RolloutBatch:
        """Collective: this rank's slice of the rollouts with annotations["values"] (values())."""
        batch.annotations["values"] = self.values(batch)
        return batch

    def export_weights(self, *args: Any, **kwargs: Any) -> list:
        raise NotImplementedError("CriticActor: a critic's weights go to no rollout engine")
