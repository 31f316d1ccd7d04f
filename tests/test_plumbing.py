"""Paths a planted bug once slipped through (issue 16): settings that must reach the maths, and the ids a
reward function is handed. Each test here fails when its path is broken the way scripts/mutations.py
breaks it."""

from __future__ import annotations

import pytest
import torch

from swiftray.actors.reward import RewardActor
from swiftray.algorithms import get_algorithm
from swiftray.algorithms.grpo import GRPO
from swiftray.arguments import RlhfArguments
from swiftray.cli_parser import parse_args
from swiftray.experience import RolloutBatch
from swiftray.rewards import register_reward


def rlhf_args(*flags: str) -> RlhfArguments:
    return parse_args(RlhfArguments, ["--model", "m", "--dataset", "d", *flags])


def one_token_batch(ratio: float, advantage: float) -> tuple[torch.Tensor, dict]:
    """A batch of one completion token whose importance ratio is `ratio`."""
    logprobs = torch.tensor([[0.0, -0.5]], requires_grad=True)
    old = logprobs.detach() - torch.tensor([[0.0, float(torch.log(torch.tensor(ratio)))]])
    batch = {"labels": torch.tensor([[-100, -100, 7]]), "old_logprobs": old,
             "advantages": torch.tensor([advantage]), "num_sequences_global": torch.tensor(1),
             "num_micro_batches_global": torch.tensor(1)}
    return logprobs, batch


@pytest.mark.parametrize("loss_type", ["grpo", "bnpo", "dr_grpo", "dapo"])
def test_grpo_loss_clips_above_at_epsilon_high(loss_type):
    """A ratio of 1.25 with a positive advantage lies inside clip-higher's 1 + 0.28 but outside 1 + 0.2:
    the gradient must flow (it is zero once clipped) and no token counts as clipped."""
    algo = GRPO(num_generations=2, beta=0.0, epsilon=0.2, epsilon_high=0.28, loss_type=loss_type,
                max_completion_length=1)
    logprobs, batch = one_token_batch(ratio=1.25, advantage=1.0)
    loss, metrics = algo.loss(logprobs, batch, num_tokens_global=1)
    loss.backward()
    assert metrics["clip_ratio/high_mean"] == 0.0
    assert logprobs.grad[0, 1].item() == pytest.approx(-1.25, rel=1e-5)  # d(-ratio * A)/d logp
    # Above 1 + epsilon_high it clips: no gradient, counted.
    logprobs, batch = one_token_batch(ratio=1.35, advantage=1.0)
    loss, metrics = algo.loss(logprobs, batch, num_tokens_global=1)
    loss.backward()
    assert metrics["clip_ratio/high_mean"] == 1.0 and logprobs.grad[0, 1].item() == 0.0
    # Below, the lower bound is epsilon's: 0.75 < 1 - 0.2 clips a negative advantage.
    logprobs, batch = one_token_batch(ratio=0.75, advantage=-1.0)
    _, metrics = algo.loss(logprobs, batch, num_tokens_global=1)
    assert metrics["clip_ratio/low_mean"] == 1.0


def test_dapo_flags_take_dapos_defaults():
    dapo = get_algorithm("dapo").from_args(rlhf_args("--rlhf_type", "dapo"))
    assert (dapo.epsilon, dapo.epsilon_high) == (0.2, 0.28)
    assert dapo.loss_type == "dapo" and dapo.dynamic_sample and dapo.overlong_filter
    # A value the user set wins over DAPO's default.
    dapo = get_algorithm("dapo").from_args(rlhf_args("--rlhf_type", "dapo", "--epsilon_high", "0.3"))
    assert dapo.epsilon_high == 0.3
    grpo = get_algorithm("grpo").from_args(rlhf_args("--rlhf_type", "grpo"))
    assert grpo.epsilon_high == 0.2 and grpo.loss_type == "grpo" and not grpo.dynamic_sample


SEEN: dict = {}


@register_reward("plumbing_probe")
def plumbing_probe(completions, completion_ids, completion_lengths, prompts, prompt_ids, **kwargs):
    SEEN.update(completion_ids=completion_ids, completion_lengths=completion_lengths, prompts=prompts,
                prompt_ids=prompt_ids, response_token_ids=kwargs.get("response_token_ids"))
    return [float(n) for n in completion_lengths]


def test_reward_actor_passes_each_completions_own_ids_and_prompts():
    actor = RewardActor()
    actor.setup({"reward_funcs": ["plumbing_probe"], "reward_kwargs": {}})
    messages = [[{"role": "user", "content": "one"}], [{"role": "user", "content": "two"}]]
    batch = RolloutBatch(prompt_ids=[[1, 2, 3], [4, 5]], completion_ids=[[9, 8], [7, 6, 5, 4]],
                         completions=["a", "b"], truncated=[False, True], group=[0, 1],
                         columns={"messages": messages}, version=0)
    total, per_func = actor.score(batch)
    assert SEEN["completion_ids"] == [[9, 8], [7, 6, 5, 4]]
    assert SEEN["response_token_ids"] == SEEN["completion_ids"]
    assert SEEN["completion_lengths"] == [2, 4] and total == [2.0, 4.0]
    assert SEEN["prompt_ids"] == [[1, 2, 3], [4, 5]]
    # TRL passes `prompts` as the conversation that was prompted (its chat format).
    assert SEEN["prompts"] == messages


VERL_FILE = '''
def compute_score(data_source, solution_str, ground_truth, extra_info=None):
    """verl's signature: one completion at a time; a dict with a "score" works too."""
    if data_source == "dict":
        return {"score": 2.0, "acc": True}
    return 1.0 if solution_str.strip() == str(ground_truth) else 0.25 * (extra_info or {}).get("bonus", 0)
'''


def test_verl_style_compute_score_is_a_reward_plugin(tmp_path):
    plugin = tmp_path / "verl_reward.py"
    plugin.write_text(VERL_FILE)
    actor = RewardActor()
    actor.setup({"reward_funcs": ["compute_score"], "external_plugins": [str(plugin)]})
    batch = RolloutBatch(prompt_ids=[[1]] * 3, completion_ids=[[2]] * 3, completions=["4", "5", "x"],
                         truncated=[False] * 3, group=[0, 0, 0], version=0,
                         columns={"solution": ["4", "4", "4"], "data_source": ["math", "math", "dict"],
                                  "extra_info": [{"bonus": 0}, {"bonus": 2}, None]})
    total, per_func = actor.score(batch)
    assert total == [1.0, 0.5, 2.0] and per_func["compute_score"] == [1.0, 0.5, 2.0]
    # verl's parquet layout: the ground truth inside the reward_model column.
    batch.columns = {"reward_model": [{"ground_truth": "5"}] * 3}
    assert actor.score(batch)[0] == [0.0, 1.0, 0.0]
