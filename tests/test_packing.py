"""Packing and collation: bin packing, padding, and packed samples that cannot see each other."""

from __future__ import annotations

import random

import pytest
import torch
from transformers import AutoModelForCausalLM

from swiftray.data.packing import IGNORE_INDEX, block_causal_mask, collate, pack_samples
from swiftray.data.template import Template

torch.set_num_threads(1)


def fake(n: int, start: int = 10) -> dict[str, list[int]]:
    ids = list(range(start, start + n))
    return {"input_ids": ids, "labels": [IGNORE_INDEX] * (n // 2) + ids[n // 2 :]}


def naive_ffd(lengths: list[int], max_length: int) -> list[list[int]]:
    """First-fit decreasing, the plain quadratic way."""
    packs, room = [], []
    for i in sorted(range(len(lengths)), key=lambda i: (-lengths[i], i)):
        for p, free in enumerate(room):
            if free >= lengths[i]:
                packs[p].append(i)
                room[p] -= lengths[i]
                break
        else:
            packs.append([i])
            room.append(max_length - lengths[i])
    return packs


# ------------------------------------------------------------------ pack_samples


def test_pack_samples_first_fit_decreasing():
    samples = [fake(n) for n in [3, 8, 5, 2, 6, 4]]
    # Decreasing: 8 -> A, 6 -> B, 5 -> C, 4 -> B (10), 3 -> C (8), 2 -> A (10).
    assert pack_samples(samples, max_length=10) == [[1, 3], [4, 5], [2, 0]]


@pytest.mark.parametrize("trial", range(5))
def test_pack_samples_matches_the_naive_algorithm(trial):
    rng = random.Random(trial)
    lengths = [rng.randint(1, 64) for _ in range(rng.randint(1, 300))]
    packs = pack_samples([fake(n) for n in lengths], max_length=64)
    assert packs == naive_ffd(lengths, 64)
    assert sorted(i for p in packs for i in p) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in p) <= 64 for p in packs)


def test_pack_samples_seed_shuffles_packs_reproducibly():
    samples = [fake(n) for n in range(1, 40)]
    plain = pack_samples(samples, 50)
    shuffled = pack_samples(samples, 50, seed=3)
    assert shuffled == pack_samples(samples, 50, seed=3) != plain
    assert sorted(shuffled) == sorted(plain)


def test_pack_samples_rejects_too_long_samples():
    with pytest.raises(ValueError, match="index 1, 11 tokens"):
        pack_samples([fake(3), fake(11)], max_length=10)


# ------------------------------------------------------------------ collate


def test_collate_unpacked_pads_right():
    a, b = fake(3), fake(5, start=20)
    batch = collate([a, b], pad_token_id=0, packing=False)
    assert batch["input_ids"].tolist() == [[10, 11, 12, 0, 0], [20, 21, 22, 23, 24]]
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, -100], [-100, -100, 22, 23, 24]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]]


def test_collate_packed_sdpa_rows_positions_labels_and_mask():
    a, b, c = fake(3), {"input_ids": [20, 21], "labels": [20, 21]}, fake(4, start=30)
    batch = collate([[a, b], [c]], pad_token_id=0, packing=True, attn_impl="sdpa")
    assert batch["input_ids"].tolist() == [[10, 11, 12, 20, 21], [30, 31, 32, 33, 0]]
    # The first token of every sample is never a target (the previous sample must not predict it).
    assert batch["labels"].tolist() == [[-100, 11, 12, -100, 21], [-100, -100, 32, 33, -100]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1], [0, 1, 2, 3, 0]]
    mask = batch["attention_mask"]
    assert mask.shape == (2, 1, 5, 5) and mask.dtype == torch.bool
    # Expected: key k visible from query q iff k <= q and both in the same sample (pad is its own sample).
    segments = [[0, 0, 0, 1, 1], [0, 0, 0, 0, 1]]
    for row, seg in enumerate(segments):
        for q in range(5):
            for k in range(5):
                assert bool(mask[row, 0, q, k]) == (k <= q and seg[k] == seg[q]), (row, q, k)


def test_collate_packed_default_attn_impl_is_sdpa():
    batch = collate([[fake(2), fake(3)]], pad_token_id=0, packing=True, attn_impl=None)
    assert batch["attention_mask"].dtype == torch.bool and batch["attention_mask"].shape == (1, 1, 5, 5)


def test_collate_packed_eager_mask_is_additive():
    batch = collate([[fake(2), fake(2)]], pad_token_id=0, packing=True, attn_impl="eager")
    mask = batch["attention_mask"]
    assert mask.dtype == torch.float32
    allowed = block_causal_mask(torch.tensor([[0, 0, 1, 1]]))
    assert torch.equal(mask == 0, allowed)
    assert (mask[~allowed] == torch.finfo(torch.float32).min).all()


def test_collate_packed_flash_is_one_row_without_mask():
    batch = collate(
        [[fake(3), fake(2)], [fake(4)]], pad_token_id=0, packing=True, attn_impl="flash_attention_2"
    )
    assert set(batch) == {"input_ids", "labels", "position_ids"}
    assert batch["input_ids"].shape == (1, 9)
    assert batch["position_ids"].tolist() == [[0, 1, 2, 0, 1, 0, 1, 2, 3]]
    assert batch["labels"][0, [0, 3, 5]].tolist() == [IGNORE_INDEX] * 3


def test_collate_rejects_bad_arguments():
    with pytest.raises(ValueError, match="list of packs"):
        collate([fake(3)], pad_token_id=0, packing=True)
    with pytest.raises(ValueError, match="attn_impl"):
        collate([[fake(3)]], pad_token_id=0, packing=True, attn_impl="flex_attention")


# ------------------------------------------------------------------ packed forward == separate forwards


@pytest.fixture(scope="module")
def encoded(tiny_tokenizer):
    template = Template(tiny_tokenizer)
    rows = [
        [
            {"role": "user", "content": f"What is {i} + {3 * i}?"},
            {"role": "assistant", "content": f"{4 * i}. " * i},
        ]
        for i in range(1, 6)
    ]
    return [template.encode(r) for r in rows]


def float64_loss(logits: torch.Tensor, labels: list[int]) -> tuple[float, int]:
    """Sum of -log p(label[t + 1] | logits[t]) over labelled positions, in float64, and their count."""
    total, count = 0.0, 0
    logp = torch.log_softmax(logits.double(), dim=-1)
    for t in range(len(labels) - 1):
        if labels[t + 1] != IGNORE_INDEX:
            total -= logp[t, labels[t + 1]].item()
            count += 1
    return total, count


@pytest.mark.parametrize("attn_impl", ["sdpa", "eager", "flash_attention_2"])
def test_packed_logits_and_loss_equal_separate_runs(tiny_model_dir, encoded, attn_impl):
    # On CPU the flash-style batch (position_ids, no mask) runs through sdpa, whose mask builder detects
    # packed sequences from position_ids the same way (only without a KV cache: use_cache=False).
    model_impl = "sdpa" if attn_impl.startswith("flash") else attn_impl
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation=model_impl).eval()
    packs = pack_samples(encoded, max_length=100)
    assert len(packs) < len(encoded) and any(len(p) > 1 for p in packs)
    batch = collate(
        [[encoded[i] for i in p] for p in packs], pad_token_id=0, packing=True, attn_impl=attn_impl
    )
    with torch.no_grad():
        out = model(**batch, use_cache=False)
        rows = [[i for p in packs for i in p]] if attn_impl.startswith("flash") else packs
        total, count = 0.0, 0
        for row, pack in enumerate(rows):
            at = 0
            for i in pack:
                ids = encoded[i]["input_ids"]
                alone = model(input_ids=torch.tensor([ids]), use_cache=False).logits[0]
                torch.testing.assert_close(out.logits[row, at : at + len(ids)], alone, atol=1e-5, rtol=0)
                loss, n = float64_loss(alone, encoded[i]["labels"])
                total, count = total + loss, count + n
                at += len(ids)
    # HF's loss over the packed batch is the token mean over all samples: nothing leaks across boundaries.
    assert out.loss.item() == pytest.approx(total / count, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU and flash-attn")
def test_packed_flash_attention_on_gpu(tiny_model_dir, encoded):
    pytest.importorskip("flash_attn")
    model = AutoModelForCausalLM.from_pretrained(
        tiny_model_dir, attn_implementation="flash_attention_2", dtype=torch.bfloat16
    ).cuda()
    packs = pack_samples(encoded, max_length=100)
    batch = collate(
        [[encoded[i] for i in p] for p in packs], pad_token_id=0, packing=True, attn_impl="flash_attention_2"
    )
    with torch.no_grad():
        out = model(**{k: v.cuda() for k, v in batch.items()}, use_cache=False)
        at = 0
        for i in [i for p in packs for i in p]:
            ids = encoded[i]["input_ids"]
            alone = model(input_ids=torch.tensor([ids]).cuda(), use_cache=False).logits[0]
            torch.testing.assert_close(out.logits[0, at : at + len(ids)], alone, atol=2e-2, rtol=0)
            at += len(ids)
