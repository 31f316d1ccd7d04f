"""The RL batch plumbing: rollouts -> training rows -> per-rank micro-batches, and overlong masking.

No Ray here: these are the functions the make_step_batch task runs. Positions are checked against
a hand-written statement of the layout (token_logprobs[t] scores token t+1).
"""

from __future__ import annotations

import math

import pytest
import torch

from swiftray.algorithms.grpo import GRPO
from swiftray.experience import (
    RolloutBatch,
    completion_logprobs_to_tokens,
    concat_rollouts,
    select,
    sequences_batch,
    split_for_ranks,
    tokens_to_completion_values,
)

torch.set_num_threads(1)
PAD = 0


def make_batch(prompt_lens: list[int], completion_lens: list[int], truncated: list[bool], rewards: list[float],
               group_size: int, version: int = 3, with_ref: bool = False) -> RolloutBatch:
    """Distinct token ids so that a misplaced token shows: prompt i uses 10+i.., completion i 100+i.."""
    prompts = [[10 + i] * n for i, n in enumerate(prompt_lens)]
    completions = [list(range(100 + 10 * i, 100 + 10 * i + n)) for i, n in enumerate(completion_lens)]
    n = len(prompts)
    ref = [[-0.1 * (i + 1) - 0.01 * k for k in range(c)] for i, c in enumerate(completion_lens)] if with_ref else None
    return RolloutBatch(
        prompt_ids=prompts, completion_ids=completions, completions=[f"c{i}" for i in range(n)],
        truncated=truncated, group=[i // group_size for i in range(n)],
        columns={"solution": [str(i) for i in range(n)]}, version=version, rewards=rewards,
        reward_per_func={"acc": list(rewards)}, ref_logprobs=ref, timings={"generate_s": 1.0},
    )


def test_sequences_batch_labels_only_the_completion():
    rows = sequences_batch([[1, 2, 3], [4]], [[7, 8], [9, 9, 9]], PAD, loss_on=[True, False])
    assert rows["input_ids"].tolist() == [[1, 2, 3, 7, 8], [4, 9, 9, 9, PAD]]
    assert rows["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert rows["labels"].tolist() == [[-100, -100, -100, 7, 8], [-100] * 5]  # row 1: loss_on False


def test_completion_values_sit_where_token_logprobs_score_them():
    prompt_lens, values = [3, 1], [[-1.0, -2.0], [-3.0, -4.0, -5.0]]
    width = 5
    laid = completion_logprobs_to_tokens(values, prompt_lens, width)
    # token_logprobs[b, t] scores input token t+1, so completion token k (at t = plen + k) sits at plen - 1 + k.
    expected = torch.zeros(2, width - 1)
    for b, (plen, vals) in enumerate(zip(prompt_lens, values)):
        for k, v in enumerate(vals):
            expected[b, plen - 1 + k] = v
    assert torch.equal(laid, expected)
    # ... which is exactly where sequences_batch's labels (shifted by one) mark loss tokens.
    rows = sequences_batch([[1] * 3, [1]], [[2, 2], [2, 2, 2]], PAD)
    assert torch.equal(rows["labels"][:, 1:] != -100, laid != 0)
    assert tokens_to_completion_values(laid, prompt_lens, [2, 3]) == values


def test_concat_renumbers_groups_and_keeps_the_oldest_version():
    a = make_batch([2, 2], [1, 2], [False, True], [1.0, 0.0], group_size=2, version=4, with_ref=True)
    b = make_batch([3, 3, 3, 3], [2, 2, 2, 2], [False] * 4, [0.0, 1.0, 1.0, 1.0], group_size=2, version=2,
                   with_ref=True)
    b.timings = {"generate_s": 2.5, "score_s": 0.5}
    empty = select(b, [])
    out = concat_rollouts([a, empty, b])
    assert len(out) == 6 and out.group == [0, 0, 1, 1, 2, 2]
    assert out.version == 2  # staleness is judged by the oldest part
    assert out.completion_ids == a.completion_ids + b.completion_ids
    assert out.columns["solution"] == ["0", "1", "0", "1", "2", "3"]
    assert out.reward_per_func["acc"] == a.rewards + b.rewards
    assert out.ref_logprobs == a.ref_logprobs + b.ref_logprobs
    assert out.timings == {"generate_s": 2.5, "score_s": 0.5}  # parts run side by side: the slowest
    picked = select(out, [4, 5])
    assert picked.completion_ids == b.completion_ids[2:] and picked.rewards == [1.0, 1.0]
    assert picked.version == 2 and picked.ref_logprobs == b.ref_logprobs[2:]
    with pytest.raises(ValueError, match="no rollouts"):
        concat_rollouts([empty])


def test_split_for_ranks_trims_each_micro_batch_and_carries_global_counts():
    batch = make_batch([2, 2, 5, 5], [1, 1, 3, 3], [False] * 4, [0.0, 1.0, 0.0, 1.0], group_size=2, with_ref=True)
    rows = GRPO(num_generations=2, beta=0.1).make_experience(batch, PAD)
    shards = split_for_ranks(rows, world_size=2, micro_batch_size=1)
    assert [len(s) for s in shards] == [2, 2]
    widths = [m["input_ids"].shape[1] for s in shards for m in s]
    assert widths == [3, 3, 8, 8]  # each trimmed to its own longest row, not the step's
    for s in shards:
        for m in s:
            assert m["ref_logprobs"].shape[1] == m["input_ids"].shape[1] - 1
            assert int(m["num_sequences_global"]) == 4 and int(m["num_micro_batches_global"]) == 4
    # rank 1's second micro-batch is row 3: its reference values survive the split in place.
    m = shards[1][1]
    assert m["ref_logprobs"][0, 4:7].tolist() == pytest.approx(batch.ref_logprobs[3])
    with pytest.raises(ValueError, match="do not split"):
        split_for_ranks(rows, world_size=3, micro_batch_size=1)


def test_make_experience_advantages_match_float64_group_formula():
    rewards = [0.0, 1.0, 1.0, 3.0, 2.0, 2.0, 2.0, 5.0]
    batch = make_batch([2] * 8, [2] * 8, [False] * 8, rewards, group_size=4)
    rows = GRPO(num_generations=4, beta=0.0).make_experience(batch, PAD)
    expected = []
    for g in range(2):
        group = rewards[4 * g:4 * g + 4]
        mean = sum(group) / 4
        std = math.sqrt(sum((r - mean) ** 2 for r in group) / 3)
        expected += [(r - mean) / (std + 1e-4) for r in group]
    assert rows["advantages"].tolist() == pytest.approx(expected, abs=1e-5)
    assert "ref_logprobs" not in rows  # beta 0: no reference needed
    with pytest.raises(ValueError, match="reference log-probs"):
        GRPO(num_generations=4, beta=0.04).make_experience(batch, PAD)


@pytest.mark.parametrize("overlong_filter", [True, False])
def test_overlong_filter_gives_truncated_completions_no_loss_tokens(overlong_filter):
    truncated = [False, True, True, False]
    batch = make_batch([2, 3, 2, 3], [2, 4, 4, 1], truncated, [0.0, 1.0, 2.0, 0.5], group_size=2)
    algo = GRPO(num_generations=2, beta=0.0, overlong_filter=overlong_filter, max_completion_length=4)
    rows = algo.make_experience(batch, PAD)
    shards = split_for_ranks(rows, world_size=2, micro_batch_size=1)
    micro = [m for s in shards for m in s]  # row i is micro-batch i here
    for i, m in enumerate(micro):
        tokens = int((m["labels"][:, 1:] != -100).sum())
        masked = overlong_filter and truncated[i]
        assert tokens == (0 if masked else len(batch.completion_ids[i]))
        # The loss gives those rows no gradient at all.
        logprobs = torch.full((1, m["input_ids"].shape[1] - 1), -1.0, requires_grad=True)
        old = torch.full_like(logprobs, -1.05)  # ratio 1.05: inside the clip range
        loss, metrics = algo.loss(logprobs, {**m, "old_logprobs": old}, num_tokens_global=10)
        loss.backward()
        has_grad = bool(logprobs.grad.abs().sum() > 0)
        assert has_grad == (not masked and float(m["advantages"]) != 0.0)
        assert metrics["num_tokens"] == tokens


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_a_step_with_every_completion_overlong_has_zero_loss_and_gradient(loss_type):
    batch = make_batch([2, 2], [3, 3], [True, True], [0.0, 1.0], group_size=2)
    algo = GRPO(num_generations=2, beta=0.0, overlong_filter=True, loss_type=loss_type, max_completion_length=3)
    [[micro]] = split_for_ranks(algo.make_experience(batch, PAD), world_size=1, micro_batch_size=2)
    logprobs = torch.full((2, micro["input_ids"].shape[1] - 1), -1.0, requires_grad=True)
    loss, _ = algo.loss(logprobs, micro, num_tokens_global=0)  # what the policy counts: no loss tokens
    loss.backward()
    assert loss.item() == 0.0 and torch.equal(logprobs.grad, torch.zeros_like(logprobs))


def test_bnpo_step_is_the_mean_of_its_micro_batches_token_means():
    """bnpo averages over each micro-batch's loss tokens; the policy sums a step's micro-batch losses,
    so each must come divided by their number (float64 restatement on the same rows)."""
    batch = make_batch([2, 2, 2, 2], [1, 3, 2, 4], [False] * 4, [0.0, 1.0, 0.5, 2.0], group_size=2)
    algo = GRPO(num_generations=2, beta=0.0, loss_type="bnpo", max_completion_length=4)
    [micros] = split_for_ranks(algo.make_experience(batch, PAD), world_size=1, micro_batch_size=2)
    assert len(micros) == 2
    step_loss, token_means = 0.0, []
    for micro in micros:
        mask = micro["labels"][:, 1:] != -100
        logprobs = torch.zeros(mask.shape, requires_grad=True)  # ratio 1 against old log-probs of 0
        micro = {**micro, "old_logprobs": torch.zeros(mask.shape)}
        loss, _ = algo.loss(logprobs, micro, num_tokens_global=int(mask.sum()))
        step_loss += loss.item()
        advantages = micro["advantages"].double()
        per_token = advantages if advantages.dim() == 2 else advantages[:, None].expand(mask.shape)
        token_means.append(float(-(per_token * mask).sum() / mask.sum()))
    assert any(abs(m) > 1e-3 for m in token_means)
    assert step_loss == pytest.approx(sum(token_means) / len(token_means), rel=1e-6)
