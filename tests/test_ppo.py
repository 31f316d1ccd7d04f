"""PPO (issue 13), without Ray: the training rows PPO.make_experience lays out against a float64
re-statement of TRL's PPO step on random rollouts, and the critic actor (values at the right
positions, value loss falls, checkpoint round trip, a reward model's head as its start).

ppo_math's formulas have their own float64 checks (test_ppo_math.py); here they are applied to
ragged rollouts with different prompt lengths and laid out in the actors' frames."""

from __future__ import annotations

import math
import random

import pytest
import torch

from swiftray.actors.policy import PolicyConfig
from swiftray.algorithms.ppo import PPO, CriticSettings, ValueLoss
from swiftray.experience import RolloutBatch, split_for_ranks

torch.set_num_threads(1)


def random_rollouts(seed: int, n: int = 6, vocab: int = 50) -> RolloutBatch:
    rng = random.Random(seed)
    prompts = [[rng.randrange(1, vocab) for _ in range(rng.randint(2, 6))] for _ in range(n)]
    completions = [[rng.randrange(1, vocab) for _ in range(rng.randint(1, 7))] for _ in range(n)]
    batch = RolloutBatch(prompts, completions, ["x"] * n, [rng.random() < 0.3 for _ in range(n)], list(range(n)),
                         {}, 0, rewards=[rng.gauss(0, 1) for _ in range(n)])
    batch.ref_logprobs = [[-rng.random() * 3 for _ in c] for c in completions]
    batch.annotations["logprobs"] = [[-rng.random() * 3 for _ in c] for c in completions]
    batch.annotations["values"] = [[rng.gauss(0, 1) for _ in range(len(c) + 1)] for c in completions]
    return batch


def trl_step(batch: RolloutBatch, kl_coef: float, gamma: float, lam: float, penalty: float | None):
    """TRL's PPO rollout processing, one row at a time in Python floats: KL-penalised token rewards with the
    score one past the last token (on the last token when the completion is the longest), GAE, returns,
    advantages whitened over every completion token. Returns per row (advantages, returns, value positions)."""
    longest = max(len(c) for c in batch.completion_ids)
    rows = []
    for b, completion in enumerate(batch.completion_ids):
        length = len(completion)
        score_at = length if length < longest else length - 1
        score = batch.rewards[b] - (penalty if penalty is not None and batch.truncated[b] else 0.0)
        rewards = [-kl_coef * (lp - ref) for lp, ref in zip(batch.annotations["logprobs"][b], batch.ref_logprobs[b])]
        rewards += [0.0] * (score_at + 1 - length)
        rewards[score_at] += score
        values = batch.annotations["values"][b][:score_at + 1]
        advantages, running = [0.0] * (score_at + 1), 0.0
        for t in reversed(range(score_at + 1)):
            following = values[t + 1] if t + 1 <= score_at else 0.0
            running = rewards[t] + gamma * following - values[t] + gamma * lam * running
            advantages[t] = running
        rows.append((advantages, [a + v for a, v in zip(advantages, values)], score_at))
    tokens = [a for (adv, _, _), c in zip(rows, batch.completion_ids) for a in adv[:len(c)]]
    mean = sum(tokens) / len(tokens)
    var = sum((a - mean) ** 2 for a in tokens) / (len(tokens) - 1)
    whitened = [[(a - mean) / math.sqrt(var + 1e-8) for a in adv[:len(c)]]
                for (adv, _, _), c in zip(rows, batch.completion_ids)]
    return whitened, [ret for _, ret, _ in rows], [at for _, _, at in rows]


@pytest.mark.parametrize("seed,penalty", [(0, None), (1, 1.0), (2, 0.5)])
def test_training_rows_equal_trls_step_in_the_actors_frames(seed, penalty):
    batch = random_rollouts(seed)
    ppo = PPO(kl_coef=0.1, gamma=0.97, lam=0.9, missing_eos_penalty=penalty)
    rows = ppo.make_experience(batch, pad_token_id=0)
    advantages, returns, score_at = trl_step(batch, 0.1, 0.97, 0.9, penalty)
    width = rows["input_ids"].shape[1]
    assert rows["advantages"].shape == rows["old_logprobs"].shape == (len(batch), width - 1)
    assert rows["returns"].shape == rows["old_values"].shape == rows["value_mask"].shape == (len(batch), width)
    for b, (prompt, completion) in enumerate(zip(batch.prompt_ids, batch.completion_ids)):
        first = len(prompt) - 1  # the position whose logits score completion token 0: the state before it
        tokens = slice(first, first + len(completion))
        assert rows["advantages"][b, tokens].tolist() == pytest.approx(advantages[b], abs=1e-5)
        assert rows["old_logprobs"][b, tokens].tolist() == pytest.approx(batch.annotations["logprobs"][b], abs=1e-6)
        assert rows["labels"][b, first + 1:first + 1 + len(completion)].tolist() == completion
        states = slice(first, first + score_at[b] + 1)
        assert rows["returns"][b, states].tolist() == pytest.approx(returns[b], abs=1e-5)
        assert rows["old_values"][b, states].tolist() == pytest.approx(
            batch.annotations["values"][b][:score_at[b] + 1], abs=1e-6)
        assert rows["value_mask"][b].nonzero().flatten().tolist() == list(range(first, first + score_at[b] + 1))
        assert not rows["advantages"][b, :first].any() and not rows["advantages"][b, first + len(completion):].any()


def test_per_position_values_keep_their_last_column_in_micro_batches():
    """The critic's frame is one wider than token_logprobs': the state after the widest row's last token."""
    batch = random_rollouts(3, n=4)
    rows = PPO().make_experience(batch, pad_token_id=0)
    shards = split_for_ranks(rows, world_size=2, micro_batch_size=1)
    for rank, shard in enumerate(shards):
        for k, micro in enumerate(shard):
            b = rank * 2 + k
            length = len(batch.prompt_ids[b]) + len(batch.completion_ids[b])
            assert micro["input_ids"].shape[1] == micro["value_mask"].shape[1] == length
            assert micro["advantages"].shape[1] == length - 1
            assert torch.equal(micro["value_mask"][0], rows["value_mask"][b, :length])


def test_experience_metrics_are_trls_objective_metrics():
    batch = random_rollouts(4)
    ppo = PPO(kl_coef=0.2)
    metrics = ppo.experience_metrics(batch, ppo.make_experience(batch, 0))
    kl = [sum(lp - ref for lp, ref in zip(lps, refs))
          for lps, refs in zip(batch.annotations["logprobs"], batch.ref_logprobs)]
    assert metrics["objective/kl"] == pytest.approx(sum(kl) / len(kl))
    assert metrics["objective/non_score_reward"] == pytest.approx(-0.2 * sum(kl) / len(kl))
    assert metrics["objective/scores"] == pytest.approx(sum(batch.rewards) / len(batch))
    assert metrics["val/num_eos_tokens"] == sum(not t for t in batch.truncated)
    assert -math.inf < metrics["val/explained_variance"] <= 1.0


# ------------------------------------------------------------------ the critic actor, in this process


@pytest.fixture(scope="module")
def critic_config(tiny_model_dir) -> PolicyConfig:
    policy = PolicyConfig(model_dir=str(tiny_model_dir), train_type="lora", adapters=["/policy/adapter"],
                          learning_rate=3e-3, total_steps=20, lr_scheduler_type="constant", seed=3,
                          forward_batch_size=3)
    return CriticSettings(str(tiny_model_dir))(policy)


def make_critic(config: PolicyConfig):
    from swiftray.actors.critic import CriticActor

    actor = CriticActor()
    actor.setup(config)
    return actor


def test_critic_settings_take_the_policys_training_and_drop_its_adapter(critic_config):
    assert critic_config.adapters == [] and critic_config.train_type == "lora"
    assert critic_config.learning_rate == 3e-3 and critic_config.total_steps == 20 and critic_config.seed == 3


def test_critic_values_are_each_completions_states_and_its_loss_falls(critic_config, tmp_path):
    from swiftray.models.value_model import load_value_model

    full = PolicyConfig(**{**critic_config.__dict__, "train_type": "full"})
    critic = make_critic(full)
    batch = random_rollouts(5, n=5, vocab=1500)
    batch = critic.annotate(batch)
    values = batch.annotations["values"]
    # The same model, one unpadded sequence at a time: value at position P-1+t is the state before token t.
    model = load_value_model(full.model_dir, seed=99)
    model.load_state_dict(critic.backend.module.state_dict())
    model.eval()
    for b, (prompt, completion) in enumerate(zip(batch.prompt_ids, batch.completion_ids)):
        assert len(values[b]) == len(completion) + 1
        with torch.no_grad():
            alone = model(input_ids=torch.tensor([prompt + completion])).logits[0, :, 0]
        assert values[b] == pytest.approx(alone[len(prompt) - 1:].tolist(), abs=1e-4)

    # Trained on PPO's rows with the value loss, the critic fits the returns.
    batch.annotations["logprobs"] = [[-1.0] * len(c) for c in batch.completion_ids]
    batch.ref_logprobs = [[-1.0] * len(c) for c in batch.completion_ids]
    rows = PPO().make_experience(batch, 0)
    [shard] = split_for_ranks(rows, 1, 5)
    loss_fn = ValueLoss(cliprange_value=10.0, vf_coef=1.0)
    losses = [critic.train_step(shard, loss_fn)["loss/value_avg"] for _ in range(15)]
    assert losses[-1] < 0.3 * losses[0], losses

    # A checkpoint holds weights and training state; a fresh critic loads it and predicts the same values.
    critic.save_checkpoint(str(tmp_path / "critic"))
    other = make_critic(full)
    assert other.load_checkpoint(str(tmp_path / "critic")) == 15
    flat = lambda values: [v for row in values for v in row]  # noqa: E731
    assert flat(other.values(batch)) == pytest.approx(flat(critic.values(batch)), abs=1e-6)
    assert (tmp_path / "critic" / "train_state" / "optimizer.safetensors").is_file()


def test_critic_starts_from_a_reward_models_head(tiny_model_dir, tmp_path):
    from swiftray.models.reward_model import load_reward_model, save_reward_model

    reward_model = load_reward_model(str(tiny_model_dir), seed=11)
    with torch.no_grad():
        reward_model.score.weight.normal_()
    save_reward_model(reward_model, str(tmp_path / "rm"))
    policy = PolicyConfig(model_dir=str(tiny_model_dir), train_type="full", total_steps=1)
    critic = make_critic(CriticSettings(str(tmp_path / "rm"))(policy))
    assert torch.equal(critic.backend.module.score.weight, reward_model.score.weight)
    lora = make_critic(CriticSettings(str(tmp_path / "rm"))(PolicyConfig(**{**policy.__dict__, "train_type": "lora"})))
    trainable = [n for n, p in lora.backend.module.named_parameters() if p.requires_grad]
    assert any("score" in n for n in trainable) and any("lora_A" in n for n in trainable)
