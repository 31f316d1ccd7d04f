"""Prompt sharing: a group's completions scored with the prompt computed once give the padded rows'
logits and gradients; the FLOP estimate keeps padded rows where packing would cost more."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from swiftray.experience import sequences_batch
from swiftray.models.logprobs import completion_logprobs
from swiftray.models.prompt_sharing import pack_shared_prompts, shared_forward

torch.set_num_threads(1)


def groups(num_prompts: int, n: int, prompt_len: int, completion_lens: list[int], seed: int = 0
           ) -> tuple[list[list[int]], list[list[int]]]:
    """n completions per prompt, adjacent like a rollout batch; varied lengths so rows need padding."""
    rng = random.Random(seed)
    prompts, completions = [], []
    for _ in range(num_prompts):
        prompt = [rng.randrange(5, 500) for _ in range(prompt_len + rng.randrange(3))]
        for _ in range(n):
            prompts.append(prompt)
            completions.append([rng.randrange(5, 500) for _ in range(rng.choice(completion_lens))])
    return prompts, completions


def test_pack_layout_prompt_once_and_index_back_to_rows():
    batch = sequences_batch([[1, 2, 3], [1, 2, 3], [4, 5]], [[7, 8], [9], [6, 6, 6]], pad_token_id=0)
    packed = pack_shared_prompts(batch["input_ids"], batch["attention_mask"], batch["prompt_lens"].tolist())
    assert packed.input_ids.tolist() == [[1, 2, 3, 7, 8, 9, 4, 5, 6, 6, 6]]
    assert packed.position_ids.tolist() == [[0, 1, 2, 3, 4, 3, 0, 1, 2, 3, 4]]
    # every real token of every row is found again in the packed sequence
    for b in range(3):
        n = int(batch["attention_mask"][b].sum())
        assert packed.input_ids[0, packed.unpack_index[b, :n]].tolist() == batch["input_ids"][b, :n].tolist()
    allowed = packed.attention_mask[0, 0]
    assert allowed[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0]  # completion 2 sees the prompt and itself
    assert allowed[4].tolist() == [1, 1, 1, 1, 1, 0, 0, 0, 0, 0, 0]  # completion 1: prompt + its own tokens
    assert not allowed[6, :6].any()  # the next group's prompt sees nothing of the first group
    assert pack_shared_prompts(batch["input_ids"][1:], batch["attention_mask"][1:], [3, 2]) is None


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_shared_logits_and_gradients_equal_padded_rows(tiny_model_dir, attn):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32, attn_implementation=attn)
    num_params = sum(p.numel() for p in model.parameters())
    prompts, completions = groups(2, 4, prompt_len=30, completion_lens=[3, 6, 11])
    batch = sequences_batch(prompts, completions, pad_token_id=0)
    real = batch["attention_mask"].bool()
    labels = batch["labels"][:, 1:]
    mask = labels != -100

    def loss_of(logits: torch.Tensor) -> torch.Tensor:
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
        return (logp * mask).sum()

    def forward(inputs: dict) -> torch.Tensor:
        return model(**inputs).logits

    padded = forward({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
    loss_of(padded).backward()
    padded_grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    shared = shared_forward(forward, batch, model, num_params)
    assert shared is not None, "2 groups of 4 completions with 30-token prompts should share"
    assert shared.shape == padded.shape
    torch.testing.assert_close(shared[real], padded[real], atol=2e-5, rtol=1e-4)
    loss_of(shared).backward()
    for p, g in zip(model.parameters(), padded_grads):
        torch.testing.assert_close(p.grad, g, atol=1e-5, rtol=1e-4)


def test_long_completions_or_unique_prompts_stay_padded(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    calls = []

    def forward(inputs: dict) -> torch.Tensor:
        calls.append(inputs["input_ids"].shape)
        return model(**inputs).logits

    # 2-token prompts and 300-token completions: one 2400-token row costs more attention than it saves.
    prompts, completions = groups(1, 8, prompt_len=2, completion_lens=[300])
    assert shared_forward(forward, sequences_batch(prompts, completions, 0), model, 10**6) is None
    prompts, completions = groups(4, 1, prompt_len=20, completion_lens=[5])  # no prompt repeats
    assert shared_forward(forward, sequences_batch(prompts, completions, 0), model, 10**6) is None
    assert calls == []


def test_reference_logprobs_same_with_and_without_sharing(tiny_model_dir, monkeypatch):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32).eval()
    prompts, completions = groups(3, 4, prompt_len=25, completion_lens=[2, 9])
    forward = model.forward
    packed_rows = []

    def spy(*args, **kwargs):
        if kwargs.get("position_ids") is not None:
            packed_rows.append(kwargs["input_ids"].shape[1])
        return forward(*args, **kwargs)

    monkeypatch.setattr(model, "forward", spy)
    shared = completion_logprobs(model, prompts, completions, pad_token_id=0, batch_size=8)
    assert len(packed_rows) == 2  # both chunks (2 groups, then 1) went through the shared path
    monkeypatch.setenv("SWIFTRAY_SHARE_PROMPTS", "0")
    padded = completion_logprobs(model, prompts, completions, pad_token_id=0, batch_size=8)
    assert [len(x) for x in shared] == [len(c) for c in completions]
    for a, b in zip(shared, padded):
        torch.testing.assert_close(torch.tensor(a), torch.tensor(b), atol=2e-5, rtol=1e-4)
