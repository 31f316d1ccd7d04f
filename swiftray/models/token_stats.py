"""Per-token statistics of a causal LM's logits at its label positions: log-probs and entropies.

Shared by the policy, the reference and the Megatron backend; pure tensor functions.
"""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token log-probs of labels[:, 1:] (fp32, [B, T-1], zero off the loss mask), the mask, the #correct.

    logits: [B, T, V] for every position, or [N, V] for the loss positions only, in order
    (`label_logits.logits_at`).
    """
    targets = labels[:, 1:]
    mask = targets != -100
    selected = (logits if logits.dim() == 2 else logits[:, :-1][mask]).float()
    wanted = targets[mask]
    values = selected.gather(-1, wanted.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(selected, dim=-1)
    logprobs = values.new_zeros(mask.shape).masked_scatter(mask, values)
    correct = (selected.argmax(dim=-1) == wanted).sum()
    return logprobs, mask, correct


@torch.no_grad()
def token_entropy(logits: torch.Tensor, mask: torch.Tensor, chunk: int = 1024) -> torch.Tensor:
    """Entropy of each next-token distribution at the loss positions, laid out like token_logprobs
    ([B, T-1], zero off the mask); logits as token_logprobs takes them.

    `chunk` positions at a time, so that the float32 copy of the logits stays small.
    """
    selected = logits if logits.dim() == 2 else logits[:, :-1][mask]
    parts = []
    for rows in selected.split(chunk):
        logp = torch.log_softmax(rows.float(), dim=-1)
        parts.append(-(logp.exp() * logp).sum(-1))
    values = torch.cat(parts) if parts else torch.zeros(0, device=logits.device)
    return torch.zeros(mask.shape, dtype=torch.float32, device=logits.device).masked_scatter(mask, values)
