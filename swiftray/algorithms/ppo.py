"""PPO with a critic (Schulman et al. 2017), as ms-swift runs it (TRL's PPOTrainer): `--rlhf_type ppo`.

Roles, all declared here (the controller has no PPO code):

    reward / reward_model   score     rule rewards (--reward_funcs) and/or a reward model (--reward_model)
    reference               annotate  the frozen starting policy's log-probs, for the KL penalty
    critic                  annotate  its values of every completion's states (actors/critic.py) ...
                            train     ... and trained beside the policy on the same shards (role_loss)
    policy                  annotate  its own log-probs of the rollouts (annotate_with_policy): the
                                      KL penalty's and the ratio's `old` log-probs

A step, in TRL's terms: one completion per prompt; token rewards `-kl_coef * (logp - ref)` with the
score (minus --missing_eos_penalty without a stop token) at the score position; GAE (--gamma,
--lam) on the critic's rollout-time values; advantages whitened over the batch's completion tokens;
then --num_ppo_epochs passes over the generation in --num_mini_batches optimizer steps, the policy
on the clipped surrogate (--cliprange) and the critic on the clipped value loss (--cliprange_value).
The numerics and their conventions (the completion frame, the score position, masks) are
`ppo_math.py`'s; here they are applied to a RolloutBatch and the results laid out as the actors
take them: per token like `token_logprobs` ([B, W-1]) for the policy, per position ([B, W]) for the
critic, whose column P-1+t is the state before completion token t (experience.completion_to_sequence).

Decisions where ms-swift has no flag:
- The critic is a model of its own with its own optimizer (TRL wraps policy and value head in one),
  trained with the policy's backend, learning rate, schedule and clipping. `--vf_coef` scales the
  critic's loss, as it scales the value term of TRL's joint loss: with Adam it mostly changes what
  gradient clipping (--max_grad_norm, per model here) does.
- Its starting weights: --value_model, else --reward_model (ms-swift's and TRL's choice), else the
  policy's --model with a fresh value head.
- Losses are per micro-batch masked means, averaged over the step's micro-batches and ranks (what
  TRL's accelerate-based step computes).
- TRL divides logits by the sampling temperature when it scores rollouts; swiftray's policy scores
  raw log-probs, for PPO as for GRPO.
- TRL reshuffles the mini-batches each PPO epoch; here each epoch walks them in the same order.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch

from swiftray.algorithms.base import Algorithm, RoleSpec, register_algorithm
from swiftray.algorithms.ppo_math import (
    explained_variance,
    kl_penalized_rewards,
    ppo_advantages,
    ppo_policy_loss,
    ppo_rollout_metrics,
    ppo_value_loss,
    value_mask,
)
from swiftray.algorithms.roles import reference_role, reward_roles
from swiftray.experience import RolloutBatch, completion_frame, completion_to_sequence, sequences_batch
from swiftray.paths import absolute

POLICY_METRICS = ("loss/policy_avg", "policy/clipfrac_avg", "policy/approxkl_avg", "val/ratio", "policy/entropy_avg")
VALUE_METRICS = ("loss/value_avg", "val/clipfrac_avg", "val/vpred")


@dataclass(frozen=True)
class CriticSettings:
    """The critic's PolicyConfig from the policy's (the plan calls this): the same backend, dtype,
    optimizer, schedule and seed, another model and no policy adapter."""

    model_dir: str

    def __call__(self, policy: Any) -> Any:
        train_type = "lora" if policy.train_type == "qlora" else policy.train_type
        return dataclasses.replace(policy, model_dir=self.model_dir, adapters=[], modules_to_save=[],
                                   use_liger_kernel=False, train_type=train_type)


def critic_role(args: Any) -> RoleSpec:
    """PPO's critic: one rank per policy rank (it takes the policy's shards), on the policy's GPUs."""
    model_dir = absolute(args.value_model or (args.reward_model[0] if args.reward_model else None) or args.model)
    return RoleSpec("critic", "swiftray.actors.critic:CriticActor", CriticSettings(model_dir),
                    phases=("annotate", "train"), scale="per_rank", wants_gpu=True, cpu_share=0.25)


@dataclass(frozen=True)
class ValueLoss:
    """The critic's loss_fn: the clipped value loss of a micro-batch (its masked mean), a share of the step."""

    cliprange_value: float
    vf_coef: float

    def __call__(self, values: torch.Tensor, batch: dict[str, Any],
                 num_tokens_global: int) -> tuple[torch.Tensor, dict[str, float]]:
        loss, metrics = ppo_value_loss(values, batch["old_values"], batch["returns"], batch["value_mask"],
                                       cliprange_value=self.cliprange_value, vf_coef=self.vf_coef)
        return loss / int(batch["num_micro_batches_global"]), {k: metrics[k] for k in VALUE_METRICS}


@dataclass
class Frames:
    """One generation in PPO's completion frame ([B, T], T the longest completion), float64."""

    mask: torch.Tensor  # completion tokens
    logprobs: torch.Tensor  # the rollout policy's
    values: torch.Tensor  # the critic's, state before token t (t = L: after the last token)
    scores: torch.Tensor  # [B], after the missing-EOS penalty
    kl: torch.Tensor
    advantages: torch.Tensor
    returns: torch.Tensor
    value_mask: torch.Tensor
    contains_eos: torch.Tensor


@register_algorithm("ppo")
@dataclass
class PPO(Algorithm):
    num_iterations: int = 4  # --num_ppo_epochs
    kl_coef: float = 0.05
    cliprange: float = 0.2
    vf_coef: float = 0.1
    cliprange_value: float = 0.2
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False
    missing_eos_penalty: float | None = None
    role_specs: tuple[RoleSpec, ...] = ()
    num_generations: int = 1
    data_source = "rollouts"
    annotate_with_policy = True
    default_temperature = 0.9

    @classmethod
    def from_args(cls, args: Any) -> PPO:
        from swiftray.arguments import ArgumentError

        if not args.reward_funcs and not args.reward_model:
            raise ArgumentError("--rlhf_type ppo needs a reward: --reward_model DIR and/or --reward_funcs NAME ...")
        roles = reward_roles(args) + ((reference_role(args),) if args.kl_coef != 0 else ()) + (critic_role(args),)
        return cls(num_iterations=args.num_ppo_epochs, kl_coef=args.kl_coef, cliprange=args.cliprange,
                   vf_coef=args.vf_coef, cliprange_value=args.cliprange_value, gamma=args.gamma, lam=args.lam,
                   whiten_rewards=args.whiten_rewards, missing_eos_penalty=args.missing_eos_penalty,
                   role_specs=roles)

    # -- experience

    def frames(self, batch: RolloutBatch) -> Frames:
        """Token rewards, GAE advantages and returns of a scored, annotated generation (ppo_math)."""
        for key in ("logprobs", "values"):
            if key not in batch.annotations:
                raise ValueError(f"PPO: the rollouts carry no {key!r} (the policy and critic annotate them)")
        width = max(len(c) for c in batch.completion_ids)
        mask = completion_frame([[1.0] * len(c) for c in batch.completion_ids], width).bool()
        logprobs = completion_frame(batch.annotations["logprobs"], width).double()
        ref = logprobs if batch.ref_logprobs is None else completion_frame(batch.ref_logprobs, width).double()
        values = completion_frame(batch.annotations["values"], width).double()
        contains_eos = torch.tensor([not t for t in batch.truncated])
        rewards, kl, scores = kl_penalized_rewards(
            torch.tensor(batch.rewards, dtype=torch.float64), logprobs, ref, mask, kl_coef=self.kl_coef,
            contains_eos=contains_eos, missing_eos_penalty=self.missing_eos_penalty)
        advantages, returns = ppo_advantages(rewards, values, mask, gamma=self.gamma, lam=self.lam,
                                             whiten_rewards=self.whiten_rewards)
        return Frames(mask, logprobs, values, scores, kl, advantages, returns, value_mask(mask), contains_eos)

    def make_experience(self, batch: RolloutBatch, pad_token_id: int) -> dict[str, torch.Tensor]:
        """Sequences with per-token advantages and old log-probs (the policy's), and per-position rollout
        values, returns and value mask (the critic's)."""
        f = self.frames(batch)
        rows = sequences_batch(batch.prompt_ids, batch.completion_ids, pad_token_id)
        prompt_lens, width = [len(p) for p in batch.prompt_ids], rows["input_ids"].shape[1]
        lengths = f.mask.sum(-1).tolist()
        counts = f.value_mask.sum(-1).tolist()
        rows["advantages"] = completion_to_sequence(f.advantages.float(), prompt_lens, lengths, width - 1)
        rows["old_logprobs"] = completion_to_sequence(f.logprobs.float(), prompt_lens, lengths, width - 1)
        rows["old_values"] = completion_to_sequence(f.values.float(), prompt_lens, counts, width)
        rows["returns"] = completion_to_sequence(f.returns.float(), prompt_lens, counts, width)
        rows["value_mask"] = completion_to_sequence(f.value_mask, prompt_lens, counts, width)
        return rows

    def experience_metrics(self, batch: RolloutBatch, rows: dict[str, torch.Tensor]) -> dict[str, float]:
        """TRL's objective/* metrics, and how much of the returns' variance the critic's values explain."""
        f = self.frames(batch)
        metrics = ppo_rollout_metrics(f.scores, f.kl, f.logprobs, f.mask, kl_coef=self.kl_coef,
                                      contains_eos=f.contains_eos)
        metrics["val/explained_variance"] = explained_variance(f.values, f.returns, f.value_mask)
        metrics["val/mean_return"] = float(f.returns[f.value_mask].mean())
        return metrics

    # -- losses

    def loss(self, token_logprobs: torch.Tensor, batch: dict[str, Any],
             num_tokens_global: int) -> tuple[torch.Tensor, dict[str, float]]:
        mask = batch["labels"][:, 1:] != -100
        loss, metrics = ppo_policy_loss(token_logprobs, batch["old_logprobs"], batch["advantages"], mask,
                                        cliprange=self.cliprange, entropies=batch.get("entropies"))
        metrics.setdefault("policy/entropy_avg", 0.0)
        return loss / int(batch["num_micro_batches_global"]), {k: metrics[k] for k in POLICY_METRICS}

    def role_loss(self, role: str) -> Any:
        if role != "critic":
            return super().role_loss(role)
        return ValueLoss(self.cliprange_value, self.vf_coef)
