"""What an algorithm is: the roles it needs, how it turns rollouts into a batch, and its losses.

Algorithms never touch Ray. The controller starts the roles an algorithm declares and calls only
what this interface declares; the policy actor computes token log-probs and calls `algorithm.loss`
on them. A user's algorithm is a subclass registered under a name:

    from swiftray.algorithms import register_algorithm
    from swiftray.algorithms.grpo import GRPO

    @register_algorithm("my_grpo")
    class MyGRPO(GRPO):
        def advantages(self, rewards, batch): ...

and is picked with `--rlhf_type my_grpo --external_plugins my_algo.py`.

Roles. Every algorithm trains the policy. One whose `data_source` is "rollouts" also gets rollout
engines, and lists the other roles it needs in `role_specs` (built in `from_args`): each a
`RoleSpec` naming its actor class, its config and the phases of a step it takes part in:

    score     right after generation, before dynamic sampling (the reward functions)
    annotate  on the rollouts that will be trained on (reference log-probs, a critic's values)
    train     trained on each step's batch beside the policy, with `role_loss(name)`

An actor in the score or annotate phase has `annotate(batch: RolloutBatch) -> RolloutBatch`; one in
the train phase has the policy's `train_step(micro_batches, loss_fn)` and `save_checkpoint` /
`load_checkpoint`. A new algorithm with a new role is one file and no edit to the controller
(scripts/plugins/value_baseline.py shows one).

Dataset-fed algorithms (`data_source = "dataset"`: SFT, DPO, KTO, ORPO, SimPO, CPO, RM) name the
`dataset_kind` their rows are (swiftray/data/kinds.py: "sft" samples, preference "pairs", "kto"
examples), which says how rows are read, encoded and batched. Their annotate-phase actors (the reference
model) have `annotate_rows(micro_batches) -> micro_batches`, which adds a per-row tensor (`ref_logps`)
to each micro-batch of a rank's shard, and `sequence_logps(micro_batches)`, which returns those values
alone; with `annotate_once` the loop calls the latter once over the dataset instead of every step. The
loop logs `summarize(metrics)` and calls `observe(metrics)` after each step (running statistics, kept
in checkpoints by `state_dict`).
`load_checkpoint`. A role that both annotates and trains is a group with a process group (a critic
on DDP or FSDP), so it annotates collectively: each rank gets an equal slice of the step's rollouts,
and what the ranks return is joined again. With `annotate_with_policy` the policy annotates the same
way, writing its own log-probs of the rollouts (`annotations["logprobs"]`), before make_experience.
A new algorithm with a new role is one file and no edit to the controller
(scripts/plugins/value_baseline.py shows one; algorithms/ppo.py and gkd.py are built-in ones).

A trained role's config may be a function of the policy's `PolicyConfig` (a critic trains with the
policy's backend, optimizer settings and schedule): the run plan calls it with the policy's config.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

ALGORITHMS: dict[str, type[Algorithm]] = {}
PHASES = ("score", "annotate", "train")
SCALES = ("one", "per_gpu", "per_rank")


def register_algorithm(name: str):
    """Class decorator: make an algorithm available as `--rlhf_type NAME`."""

    def wrap(cls: type[Algorithm]) -> type[Algorithm]:
        ALGORITHMS[name] = cls
        cls.name = name
        return cls

    return wrap


def get_algorithm(name: str) -> type[Algorithm]:
    if name not in ALGORITHMS:
        raise ValueError(f"--rlhf_type {name!r}: unknown algorithm; registered: {', '.join(sorted(ALGORITHMS))} "
                         "(add your own with --external_plugins)")
    return ALGORITHMS[name]


@dataclass(frozen=True)
class RoleSpec:
    """A role an algorithm needs besides the policy and the rollout engines.

    `actor` is "module:Class", imported only where the role starts, so that the algorithm stays free
    of Ray. `scale` says how many workers: "one"; "per_gpu" (one per policy GPU on a GPU cluster,
    sharing it; one on CPU); "per_rank" (one per policy rank: what a trained role needs, since it
    takes the same shards as the policy).
    """

    name: str
    actor: str
    config: Any
    phases: tuple[str, ...]
    scale: str = "one"
    wants_gpu: bool = True  # placed on the policy's GPUs when the cluster has any
    cpu_share: float = 0.25  # logical CPUs per worker on a CPU cluster

    def __post_init__(self) -> None:
        bad = [p for p in self.phases if p not in PHASES]
        if not self.phases or bad:
            raise ValueError(f"role {self.name!r}: phases {self.phases} must be a non-empty subset of {PHASES}")
        if self.scale not in SCALES:
            raise ValueError(f"role {self.name!r}: scale {self.scale!r}, expected one of {SCALES}")
        if "train" in self.phases and self.scale != "per_rank":
            raise ValueError(f"role {self.name!r} trains, so it needs scale='per_rank' (the policy's shards)")


class Algorithm:
    """Base class: the defaults of every part of the interface. Subclasses implement `loss`
    (and `make_experience` for RL)."""

    name: str = "base"
    # "rollouts": the driver generates each step's data; "dataset": batches come from the dataset (SFT).
    data_source: str = "dataset"
    # Optimizer passes over each step's batch (PPO-style reuse; >1 needs the old log-probs).
    num_iterations: int = 1
    # How many weight versions older than the policy a rollout may be (async generation).
    max_staleness: int = 0
    # Whether groups filtered out by keep_groups are replaced by generating more (DAPO).
    resample_filtered: bool = False
    role_specs: tuple[RoleSpec, ...] = ()
    # Dataset-fed algorithms: what a row is ("sft", "pairs", "kto"; see swiftray/data/kinds.py).
    dataset_kind: str = "sft"
    # Dataset-fed algorithms: annotate-phase roles run once over the dataset, not every step
    # (--precompute_ref_log_probs).
    annotate_once: bool = False
    # What the policy trains: "lm" (token log-probs reach `loss`) or "score" (a sequence-classification
    # head: one score per row reaches `loss`; reward models).
    policy_head: str = "lm"

    @classmethod
    def from_args(cls, args: Any) -> Algorithm:
        """The algorithm as the flags configure it (an algorithm without settings: its defaults)."""
        return cls()
    # Completions sampled per prompt (GRPO's group size; 1 for PPO and GKD).
    num_generations: int = 1
    # Sampling temperature when --temperature is unset (ms-swift: 0.9 for PPO and GKD; swiftray's GRPO: 1.0).
    default_temperature: float = 1.0
    # The policy annotates the rollouts with its log-probs (annotations["logprobs"]) before make_experience,
    # which must then put them in the rows as `old_logprobs` (the controller does not recompute them).
    annotate_with_policy: bool = False
    # The policy's loss_fn also gets `logits` [N, V]: the logits at the label positions, in the order of
    # the loss mask, with gradient (GKD's divergence needs the whole next-token distribution).
    loss_needs_logits: bool = False
    # Prompt rows keep their dataset response as `response_ids` (GKD's off-policy steps train on them).
    uses_dataset_responses: bool = False
    # The rollout engines return each completion's token log-probs (annotations["rollout_logprobs"]): the
    # algorithm corrects for the engines' mismatch with the policy (GRPO's rollout correction).
    uses_rollout_logprobs: bool = False

    def roles(self) -> tuple[str, ...]:
        """Every role the run starts, by name."""
        generated = ("rollout",) if self.data_source == "rollouts" else ()
        return ("policy", *generated, *(spec.name for spec in self.role_specs))

    def needs_reference(self) -> bool:
        return "reference" in self.roles()

    def keep_groups(self, batch: Any) -> list[int]:
        """Indices of the scored completions worth training on (all, unless the algorithm filters)."""
        return list(range(len(batch)))

    def step_sampling(self, step: int, sampling: Any) -> Any:
        """The SamplingParams of training step `step` (1-based), given the plan's: the plan's, unless the
        algorithm varies them (GKD's off-policy steps take the dataset's responses instead)."""
        return sampling

    def make_experience(self, batch: Any, pad_token_id: int) -> dict[str, torch.Tensor]:
        """A scored, annotated RolloutBatch -> the step's training rows (see experience.py)."""
        raise NotImplementedError(f"{type(self).__name__} generates no rollouts")

    def experience_metrics(self, batch: Any, rows: dict[str, torch.Tensor]) -> dict[str, float]:
        """Metrics of a step's rollouts and rows, logged beside the rewards (PPO's KL and scores)."""
        return {}

    def loss(self, token_logprobs: torch.Tensor, batch: dict[str, Any],
             num_tokens_global: int) -> tuple[torch.Tensor, dict[str, float]]:
        """Policy loss of one micro-batch. `token_logprobs[b, t]` is log p(labels[b, t+1] | tokens <= t);
        `num_tokens_global` counts loss tokens over every rank and micro-batch of the step."""
        raise NotImplementedError

    def role_loss(self, role: str) -> Any:
        """The loss function a trained role (phase "train") calls on its own outputs."""
        raise NotImplementedError(f"{type(self).__name__} declares no trained role {role!r}")

    def summarize(self, metrics: dict[str, float]) -> dict[str, float]:
        """A step's metrics (reduced over ranks and micro-batches) as they are logged; KTO turns its
        sums and counts into means here."""
        return metrics

    def observe(self, metrics: dict[str, float]) -> None:
        """Called on the driver after each optimizer step of a dataset-fed run with its reduced metrics:
        an algorithm with running statistics (DPO's bco_pair) updates them here; they reach the policy
        with the next step's loss function."""

    def state_dict(self) -> dict[str, Any]:
        """Running statistics to keep in checkpoints (JSON values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore what `state_dict` returned."""


def single_loss_type(args: Any, allowed: tuple[str, ...], default: str) -> str:
    """The one --loss_type an algorithm takes (the flag is a list for DPO's mixtures), or its default."""
    from swiftray.arguments import ArgumentError

    given = list(getattr(args, "loss_type", None) or [])
    if not given:
        return default
    if len(given) > 1 or given[0] not in allowed:
        raise ArgumentError(f"--loss_type {' '.join(given)}: --rlhf_type {args.rlhf_type} takes one of "
                            f"{', '.join(allowed)}")
    return given[0]
