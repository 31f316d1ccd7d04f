"""On-policy distillation, GKD (Agarwal et al. 2024), as ms-swift runs it: `--rlhf_type gkd`.

Roles, declared here: the rollout engines sample the student (the policy); a frozen **teacher**
(`--teacher_model`, actors/teacher.py) annotates each completion with its next-token log-probs; the
student trains on the generalised Jensen-Shannon divergence between its next-token distribution
and the teacher's at every completion token (`gkd_math.generalized_jsd_loss`; `--beta` 0 is the
forward KL, 1 the reverse KL, default 0.5; both distributions at `--temperature`, default 0.9).

Which completions a step trains on (`--lmbda`, 0.5): with probability lmbda the student's own
samples (on-policy), otherwise the dataset's responses (`step_sampling` asks the rollout engines for
them instead of samples: nothing is generated on those steps). ms-swift's draw, seeded by --seed and
the step, so a resumed run makes the same choices. `--sft_alpha` adds that weight times the NLL of
the dataset's responses on the dataset steps. `--seq_kd` (teacher-generated responses) is refused,
as ms-swift, which deprecated it, refuses it.

What the teacher sends. A student's loss needs the teacher's whole next-token distribution at each
completion token, which is [N, V] for N tokens: fine for small vocabularies, but a 150k vocabulary
makes it 600 KB a token. `--gkd_logits_topk k` sends the teacher's k most likely tokens (values and
ids) instead, and the divergence is taken over those k tokens, both distributions renormalised there
(ms-swift's top-k mode). Either way only completion tokens cross the object store, never the padded
[B, T, V] logits, and the student's logits stay in the student (the policy actor hands them to this
loss: `loss_needs_logits`). Log-probs (temperature 1) stand in for logits: a softmax at any
temperature is the same for both, since they differ by a constant per position.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from typing import Any

import torch

from swiftray.actors.configs import TeacherConfig
from swiftray.algorithms.base import Algorithm, RoleSpec, register_algorithm
from swiftray.algorithms.gkd_math import generalized_jsd_loss, gkd_data_source
from swiftray.experience import RolloutBatch, completion_to_sequence, sequences_batch
from swiftray.paths import absolute

logger = logging.getLogger("swiftray")
DEFAULT_BETA = 0.5  # ms-swift's GKD default
DEFAULT_TEMPERATURE = 0.9  # ms-swift's rlhf default
FULL_VOCAB_WARN_BYTES = 1 << 30  # per step, when the teacher sends whole distributions


def teacher_role(args: Any) -> RoleSpec:
    config = TeacherConfig(model_dir=absolute(args.teacher_model), topk=args.gkd_logits_topk, attn_impl=args.attn_impl)
    return RoleSpec("teacher", "swiftray.actors.teacher:TeacherActor", config, phases=("annotate",),
                    scale="per_gpu", wants_gpu=True, cpu_share=0.25)


@register_algorithm("gkd")
@dataclass
class GKD(Algorithm):
    beta: float = DEFAULT_BETA
    temperature: float = DEFAULT_TEMPERATURE
    lmbda: float = 0.5
    sft_alpha: float = 0.0
    seed: int = 42
    role_specs: tuple[RoleSpec, ...] = ()
    num_generations: int = 1
    data_source = "rollouts"
    loss_needs_logits = True
    default_temperature = DEFAULT_TEMPERATURE

    @classmethod
    def from_args(cls, args: Any) -> GKD:
        from swiftray.arguments import ArgumentError

        if not args.teacher_model:
            raise ArgumentError("--rlhf_type gkd needs --teacher_model DIR (the model to distil from)")
        if args.temperature == 0:
            raise ArgumentError("--temperature 0: GKD divides both models' logits by the temperature; "
                                "pass a positive one (unset: 0.9)")
        warn_full_vocabulary(args)
        return cls(beta=DEFAULT_BETA if args.beta is None else args.beta,
                   temperature=DEFAULT_TEMPERATURE if args.temperature is None else args.temperature,
                   lmbda=args.lmbda, sft_alpha=args.sft_alpha, seed=args.seed, role_specs=(teacher_role(args),))

    @property
    def uses_dataset_responses(self) -> bool:  # type: ignore[override]
        return self.lmbda < 1.0

    def step_sampling(self, step: int, sampling: Any) -> Any:
        """The student's samples with probability lmbda, else the dataset's responses (gkd_data_source)."""
        if gkd_data_source(step, lmbda=self.lmbda, seed=self.seed) == "student":
            return sampling
        return dataclasses.replace(sampling, from_dataset=True)

    # -- experience

    def make_experience(self, batch: RolloutBatch, pad_token_id: int) -> dict[str, torch.Tensor]:
        """Sequences with the teacher's log-probs (and top-k ids) laid out like token_logprobs:
        [B, W-1, V] or [B, W-1, k]; `from_dataset` [B] marks the dataset-response rows."""
        if "teacher_logprobs" not in batch.annotations:
            raise ValueError("GKD: the rollouts carry no teacher log-probs (the teacher annotates them)")
        rows = sequences_batch(batch.prompt_ids, batch.completion_ids, pad_token_id)
        prompt_lens, width = [len(p) for p in batch.prompt_ids], rows["input_ids"].shape[1]
        lengths = [len(c) for c in batch.completion_ids]
        rows["teacher_logprobs"] = completion_to_sequence(_stack(batch.annotations["teacher_logprobs"]),
                                                          prompt_lens, lengths, width - 1)
        if "teacher_token_ids" in batch.annotations:
            ids = _stack(batch.annotations["teacher_token_ids"]).long()
            rows["teacher_token_ids"] = completion_to_sequence(ids, prompt_lens, lengths, width - 1)
        rows["from_dataset"] = torch.tensor(batch.annotations.get("from_dataset", [False] * len(batch)))
        return rows

    def experience_metrics(self, batch: RolloutBatch, rows: dict[str, torch.Tensor]) -> dict[str, float]:
        return {"gkd/on_policy": float(not rows["from_dataset"].any())}

    # -- loss

    def loss(self, token_logprobs: torch.Tensor, batch: dict[str, Any],
             num_tokens_global: int) -> tuple[torch.Tensor, dict[str, float]]:
        """The generalised JSD, a token mean over the step; plus sft_alpha x the NLL of dataset rows."""
        mask = batch["labels"][:, 1:] != -100
        student, teacher = batch["logits"], batch["teacher_logprobs"][mask]
        if "teacher_token_ids" in batch:
            ids = batch["teacher_token_ids"][mask]
            if ids.numel() and int(ids.max()) >= student.shape[-1]:
                raise ValueError(f"GKD: teacher token id {int(ids.max())} is outside the student's vocabulary "
                                 f"({student.shape[-1]}); teacher and student must share a tokenizer")
            student = student.gather(-1, ids)
        tokens = max(1, num_tokens_global)
        loss, metrics = generalized_jsd_loss(student, teacher, beta=self.beta, temperature=self.temperature,
                                             num_tokens_global=tokens)
        dataset_rows = batch["from_dataset"].to(token_logprobs.device).bool()[:, None] & mask
        nll = -(token_logprobs * dataset_rows).sum() / tokens
        if self.sft_alpha:
            loss = loss + self.sft_alpha * nll
        return loss, {"jsd": metrics["jsd"], "sft_nll": float(nll.detach())}


def _stack(per_completion: list[torch.Tensor]) -> torch.Tensor:
    """Per-completion [L, K] tensors as one right-padded [B, T, K] tensor."""
    width = max(t.shape[0] for t in per_completion)
    out = per_completion[0].new_zeros((len(per_completion), width, *per_completion[0].shape[1:]))
    for i, t in enumerate(per_completion):
        out[i, :t.shape[0]] = t
    return out


def warn_full_vocabulary(args: Any) -> None:
    """Without --gkd_logits_topk the teacher sends [tokens, vocabulary] log-probs: say so when that is large."""
    import json
    import os

    if args.gkd_logits_topk:
        return
    try:
        with open(os.path.join(args.teacher_model, "config.json"), encoding="utf-8") as f:
            vocab = int(json.load(f).get("vocab_size") or 0)
    except (OSError, ValueError):
        return
    per_step = args.per_device_train_batch_size * args.world_size * args.gradient_accumulation_steps
    estimate = per_step * args.max_completion_length * vocab * 4
    if estimate > FULL_VOCAB_WARN_BYTES:
        logger.warning("gkd: the teacher sends whole next-token distributions (vocabulary %d): up to %.1f GiB a "
                       "step through the object store; --gkd_logits_topk 64 sends 512 bytes a token instead",
                       vocab, estimate / (1 << 30))
