"""Logits only at the loss positions: same log-probs, accuracy, entropies and gradients as full logits."""

from __future__ import annotations

import torch
from transformers import Qwen3Config, Qwen3ForCausalLM

from swiftray.models.label_logits import logits_at
from swiftray.models.token_stats import token_entropy, token_logprobs

torch.set_num_threads(1)


def model_and_batch(tie: bool) -> tuple[Qwen3ForCausalLM, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=32, max_position_embeddings=64,
                         tie_word_embeddings=tie)
    ids = torch.randint(0, 300, (3, 12))
    labels = ids.clone()
    labels[:, :5] = -100  # a prompt
    labels[1, 9:] = -100  # padding
    labels[2] = -100  # a row without loss tokens
    return Qwen3ForCausalLM(config), ids, labels


def test_label_positions_only_match_full_logits():
    for tie in (False, True):
        model, ids, labels = model_and_batch(tie)
        full = model(input_ids=ids).logits
        want_lp, want_mask, want_correct = token_logprobs(full, labels)
        want_lp.sum().backward()
        want_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()

        mask = labels[:, 1:] != -100
        with logits_at(model, mask) as applied:
            selected = model(input_ids=ids).logits
        assert applied and selected.shape == (int(mask.sum()), 300)
        assert not model.lm_head._forward_pre_hooks  # removed after the block
        lp, got_mask, correct = token_logprobs(selected, labels)
        torch.testing.assert_close(lp, want_lp, atol=1e-6, rtol=1e-5)
        assert torch.equal(got_mask, want_mask) and int(correct) == int(want_correct)
        assert (lp[~mask] == 0).all() and (lp[mask] < 0).all()
        torch.testing.assert_close(token_entropy(selected, mask), token_entropy(full, mask))
        lp.sum().backward()
        for p, g in zip(model.parameters(), want_grads):
            torch.testing.assert_close(p.grad, g, atol=1e-6, rtol=1e-5)


def test_entropy_matches_the_formula():
    logits = torch.randn(2, 4, 7, dtype=torch.float64)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    got = token_entropy(logits, mask)
    for b in range(2):
        for t in range(3):
            p = torch.softmax(logits[b, t], -1)
            want = float(-(p * p.log()).sum()) if mask[b, t] else 0.0
            assert abs(float(got[b, t]) - want) < 1e-5
