"""Per-token log-probs of given completions, batched: used by the reference model and the hf engine."""

from __future__ import annotations

from typing import Any

import torch

from swiftray.experience import sequences_batch, tokens_to_completion_values
from swiftray.models.prompt_sharing import shared_forward


@torch.no_grad()
def completion_logprobs(model: Any, prompt_ids: list[list[int]], completion_ids: list[list[int]],
                        pad_token_id: int, batch_size: int = 16) -> list[list[float]]:
    """log p(completion token | prefix) for each completion token, as Python lists."""
    device = next(model.parameters()).device
    num_params = sum(p.numel() for p in model.parameters())
    out: list[list[float]] = []
    for start in range(0, len(prompt_ids), batch_size):
        p, c = prompt_ids[start:start + batch_size], completion_ids[start:start + batch_size]
        batch = {k: v.to(device) for k, v in sequences_batch(p, c, pad_token_id).items()}
        logits = shared_forward(lambda inputs: model(**inputs).logits, batch, model, num_params)
        if logits is None:
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        logits = logits[:, :-1].float()
        targets = batch["input_ids"][:, 1:]
        token_lp = torch.log_softmax(logits, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1).cpu()
        out += tokens_to_completion_values(token_lp, [len(x) for x in p], [len(x) for x in c])
    return out
