"""The numerics of on-policy distillation, GKD (Agarwal et al. 2024): the generalised Jensen-Shannon
divergence between the student's and the teacher's next-token distributions, and which data a step
trains on.

Pure tensor functions, no Ray. Semantics follow ms-swift's GKD (``swift/rlhf_trainers/gkd_loss.py``),
itself TRL's ``GKDTrainer.generalized_jsd_loss``:

- Both logits are divided by ``temperature`` (ms-swift's ``--temperature``, 0.9, the sampling
  temperature; TRL's trainer leaves the loss at temperature 1), then log-softmaxed over the vocabulary.
- ``beta`` in (0, 1): with the mixture ``M = (1 - beta) S + beta T`` (probabilities),
  ``JSD_beta = beta * KL(T || M) + (1 - beta) * KL(S || M)``, summed over the vocabulary.
  The endpoints are TRL's special cases, not the limits of that formula (which vanish):
  ``beta = 0`` is the forward KL ``KL(T || S)`` (the teacher's view, as in word-level KD) and
  ``beta = 1`` the reverse KL ``KL(S || T)`` (mode seeking).
- Reduction: TRL's ``batchmean`` over tokens -- the sum over the selected positions of the per-position
  divergence, divided by the number of positions (``labels != -100``; ms-swift: ``total / num_valid``).
- Vocabularies of different sizes (padded embedding tables) are aligned as ms-swift does: the shorter
  one's missing columns take the other model's logits, so those columns agree.

Memory. ``generalized_jsd_loss`` walks the positions ``chunk_size`` at a time and keeps nothing per chunk
for the backward pass: the backward recomputes each chunk's divergence and its gradient, so the peak is
a few ``[chunk_size, V]`` float32 buffers plus the gradient of the logits themselves. Callers that build
the logits in chunks (e.g. from hidden states) call it per chunk with ``num_tokens_global`` and add the
results.

Multi-worker use: with ``num_tokens_global`` (the selected-token count of the whole optimizer step, all
ranks and micro-batches) the loss is this slice's share, so the sum over every micro-batch and rank is
the single-process ``batchmean``; backends that average gradients over ranks multiply by the world size.
Without it the loss is this slice's own ``batchmean`` (ms-swift's and TRL's per-micro-batch loss).

Data source (``gkd_data_source``): with probability ``lmbda`` (``--lmbda``, 0.5) a step trains on the
student's own samples (on-policy); otherwise on the dataset's responses, or, with ``--seq_kd``, on
teacher-generated ones (TRL; ms-swift has deprecated ``seq_kd`` and rejects it).
"""

from __future__ import annotations

import math
import random
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

DataSource = Literal["student", "teacher", "dataset"]


def _check_beta_temperature(beta: float, temperature: float) -> None:
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1] (0 forward KL, 1 reverse KL), got {beta}")
    if not temperature > 0.0:
        raise ValueError(f"temperature must be positive, got {temperature}")


def align_vocab(student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    """Give both logits the larger vocabulary: the shorter one's extra columns are copied from the other."""
    student_vocab, teacher_vocab = student_logits.shape[-1], teacher_logits.shape[-1]
    if student_vocab < teacher_vocab:
        student_logits = torch.cat([student_logits, teacher_logits[..., student_vocab:].detach()], dim=-1)
    elif teacher_vocab < student_vocab:
        teacher_logits = torch.cat([teacher_logits, student_logits[..., teacher_vocab:].detach()], dim=-1)
    return student_logits, teacher_logits


def _kl(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(p || q) per position, summed over the last dimension, from log-probabilities."""
    return (log_p.exp() * (log_p - log_q)).sum(-1)


def generalized_jsd(
    student_logits: Tensor, teacher_logits: Tensor, beta: float = 0.5, temperature: float = 1.0
) -> Tensor:
    """The per-position generalised JSD ``[...]`` of logits ``[..., V]`` (see the module docstring).

    Plain autograd over the whole input: use ``generalized_jsd_loss`` for large batches and vocabularies.
    """
    _check_beta_temperature(beta, temperature)
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits)
    student_logp = F.log_softmax(student_logits / temperature, dim=-1)
    teacher_logp = F.log_softmax(teacher_logits / temperature, dim=-1)
    if beta == 0.0:
        return _kl(teacher_logp, student_logp)
    if beta == 1.0:
        return _kl(student_logp, teacher_logp)
    mixture_logp = torch.logaddexp(student_logp + math.log1p(-beta), teacher_logp + math.log(beta))
    return beta * _kl(teacher_logp, mixture_logp) + (1.0 - beta) * _kl(student_logp, mixture_logp)


class _ChunkedJSDSum(torch.autograd.Function):
    """Sum of ``generalized_jsd`` over the rows of ``[P, V]`` logits, ``chunk`` rows at a time, that saves
    only its inputs: the backward recomputes each chunk under autograd and returns its gradient."""

    @staticmethod
    def forward(ctx, student: Tensor, teacher: Tensor, beta: float, temperature: float, chunk: int) -> Tensor:
        ctx.save_for_backward(student, teacher)
        ctx.beta, ctx.temperature, ctx.chunk = beta, temperature, chunk
        total = torch.zeros((), dtype=torch.float64, device=student.device)
        for start in range(0, student.shape[0], chunk):
            rows = slice(start, start + chunk)
            total += (
                generalized_jsd(_upcast(student[rows]), _upcast(teacher[rows]), beta, temperature)
                .sum()
                .double()
            )
        return total.to(torch.float32 if student.dtype in _HALF else student.dtype)

    @staticmethod
    def backward(ctx, grad_total: Tensor):
        student, teacher = ctx.saved_tensors
        want_student, want_teacher = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad_student = torch.zeros_like(student) if want_student else None
        grad_teacher = torch.zeros_like(teacher) if want_teacher else None
        for start in range(0, student.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            with torch.enable_grad():
                s = student[rows].detach().requires_grad_(want_student)
                t = teacher[rows].detach().requires_grad_(want_teacher)
                part = generalized_jsd(_upcast(s), _upcast(t), ctx.beta, ctx.temperature).sum()
                inputs = [x for x, want in ((s, want_student), (t, want_teacher)) if want]
                grads = torch.autograd.grad(part, inputs, grad_outputs=grad_total.to(part.dtype))
            grads = list(grads)
            if want_student:
                grad_student[rows] = grads.pop(0)
            if want_teacher:
                grad_teacher[rows] = grads.pop(0)
        return grad_student, grad_teacher, None, None, None


_HALF = (torch.float16, torch.bfloat16)


def _upcast(x: Tensor) -> Tensor:
    """bf16/fp16 logits are softmaxed in float32, as the policy's log-probs are."""
    return x.float() if x.dtype in _HALF else x


def generalized_jsd_loss(
    student_logits: Tensor,
    teacher_logits: Tensor,
    mask: Tensor | None = None,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    chunk_size: int = 1024,
    num_tokens_global: int | float | None = None,
) -> tuple[Tensor, dict[str, float]]:
    """The GKD loss: the generalised JSD summed over the selected positions, divided by their number.

    Logits ``[B, T, V]`` with a bool ``mask [B, T]`` (already aligned to the next-token positions: the
    labels shifted, ``labels != -100``), or ``[N, V]`` for N selected positions with ``mask=None``. The
    teacher's logits normally carry no gradient; when they do, it is computed too. Returns the loss and
    ``{"jsd": per-token mean, "num_tokens": N}``.
    """
    _check_beta_temperature(beta, temperature)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be >= 1, got {chunk_size}")
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"student and teacher logits must cover the same positions; got {tuple(student_logits.shape)} "
            f"and {tuple(teacher_logits.shape)}"
        )
    if mask is not None:
        if mask.shape != student_logits.shape[:-1]:
            raise ValueError(f"mask must be {tuple(student_logits.shape[:-1])}, got {tuple(mask.shape)}")
        student_logits, teacher_logits = student_logits[mask.bool()], teacher_logits[mask.bool()]
    else:
        student_logits = student_logits.reshape(-1, student_logits.shape[-1])
        teacher_logits = teacher_logits.reshape(-1, teacher_logits.shape[-1])
    student_logits, teacher_logits = align_vocab(student_logits, teacher_logits)
    num_tokens = student_logits.shape[0]
    total = _ChunkedJSDSum.apply(student_logits, teacher_logits, beta, temperature, chunk_size)
    if num_tokens_global is not None:
        if num_tokens_global <= 0:
            raise ValueError(f"num_tokens_global must be positive, got {num_tokens_global}")
        loss = total / num_tokens_global
    else:
        loss = total / max(num_tokens, 1)  # no tokens: 0 with a gradient path, as TRL's clamp_min(1)
    metrics = {"jsd": float(total.detach()) / max(num_tokens, 1), "num_tokens": float(num_tokens)}
    return loss, metrics


def gkd_data_source(step: int, *, lmbda: float = 0.5, seq_kd: bool = False, seed: int = 42) -> DataSource:
    """Which completions optimizer step ``step`` trains on: ``"student"`` (generate with the student,
    on-policy) with probability ``lmbda``; else ``"teacher"`` with ``seq_kd`` (sequence-level KD on
    teacher generations) or ``"dataset"`` (the dataset's responses, off-policy).

    The draw is ``random.Random(seed + step).random() < lmbda``, as ms-swift seeds it (``--seed``, 42),
    so every process and a resumed run make the same choice; ``<`` makes lmbda 0 and 1 exact.
    """
    if not 0.0 <= lmbda <= 1.0:
        raise ValueError(f"lmbda must be in [0, 1] (the share of on-policy steps), got {lmbda}")
    if random.Random(seed + step).random() < lmbda:
        return "student"
    return "teacher" if seq_kd else "dataset"
