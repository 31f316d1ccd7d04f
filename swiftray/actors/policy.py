"""PolicyActor: one rank of the policy trainer, used by SFT and by RL algorithms alike.

The actor knows how to run a model (forward, backward, optimizer step, checkpoints,
weight export) on a backend; it never knows what is being optimised. An algorithm
hands in a picklable `loss_fn`:

    loss_fn(token_logprobs, batch, num_tokens_global) -> (loss, metrics)

`token_logprobs[b, t]` is log p(labels[b, t+1] | tokens <= t), in float32, zero where
labels[b, t+1] == -100 (with a score head, PolicyConfig.head "score", each row's score [B] instead). `batch` is the micro-batch as given plus `loss_mask`
(labels[:, 1:] != -100); extra per-token tensors (advantages, old log-probs) should
be [B, T-1] and aligned with token_logprobs. `num_tokens_global` counts loss tokens
over all ranks and micro-batches of the step, so a loss normalised by it gives the
same gradient on N ranks as on one. On request (`train_step(..., with_logits=True)`) the
batch also holds `logits` [N, V]: the logits at the N loss positions, in the mask's
row-major order, with gradient (a distillation loss needs the whole distribution).

Every method here is collective: call it on all ranks (ActorGroup.call_all*).
"""

from __future__ import annotations

import dataclasses
import gc
import logging
import math
import os
import random
from collections.abc import Callable
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist

from swiftray.actors import shared_weights, train_state
from swiftray.actors.backends import BACKENDS, adamw_factory, make_backend
from swiftray.actors.group import DistributedWorker
from swiftray.experience import sequences_batch, tokens_to_completion_values
from swiftray.models import prompt_sharing
from swiftray.models.label_logits import logits_at
from swiftray.models.loader import load_model, peft_to_base_state_dict
from swiftray.models.token_stats import token_entropy, token_logprobs

MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")
LossFn = Callable[[torch.Tensor, dict, int], tuple[torch.Tensor, dict]]


@dataclasses.dataclass
class PolicyConfig:
    """Everything `PolicyActor.setup` accepts; names follow ms-swift's flags."""

    model_dir: str
    # "lm": loss_fn gets token log-probs; "score": a one-output sequence-classification head, and loss_fn
    # gets each row's score [B] in their place (reward models).
    head: str = "lm"
    torch_dtype: str = "float32"
    attn_impl: str | None = None
    gradient_checkpointing: bool = False
    train_type: str = "full"
    adapters: list[str] = dataclasses.field(default_factory=list)  # LoRA folder(s) to keep training
    lora_rank: int = 8
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    target_modules: list[str] = dataclasses.field(default_factory=lambda: ["all-linear"])
    modules_to_save: list[str] = dataclasses.field(default_factory=list)
    use_liger_kernel: bool = False
    seed: int = 42
    backend: str = "ddp"  # ddp | fsdp2 | deepspeed
    deepspeed: str | None = None  # zero2 (the default) | zero3 | zero2_offload | zero3_offload | a JSON path
    fsdp_reshard_after_forward: bool = True  # --fsdp full_shard (True) or shard_grad_op (False)
    fsdp_offload: bool = False  # --fsdp offload: parameters and optimizer state in CPU memory (GPU only)
    learning_rate: float = 1e-5
    weight_decay: float = 0.1
    adam_betas: tuple[float, float] = (0.9, 0.999)
    adam_epsilon: float = 1e-8
    lr_scheduler_type: str = "cosine"  # cosine | linear | constant (each after linear warmup)
    warmup_ratio: float = 0.0
    warmup_steps: int = 0  # > 0 overrides warmup_ratio
    total_steps: int = 1  # optimizer steps in the run: the schedule's length
    max_grad_norm: float = 1.0  # <= 0: no clipping (the norm is still reported)
    # Informational: a step accumulates over however many micro-batches train_step is given.
    gradient_accumulation_steps: int | None = None
    # A step whose loss or gradient norm is not finite is skipped (nothing changes); the Nth such
    # step in a row stops the run with an error. 1: stop at the first; 0: never stop, skip them all.
    max_nonfinite_steps: int = 3
    # Rows per forward when annotating rollouts (--local_rollout_forward_batch_size).
    forward_batch_size: int = 64
    # The rollout engines' dtype when it differs from torch_dtype (--rollout_dtype): weights are cast
    # before they are sent (a bf16 engine gets half the bytes of an fp32 policy).
    engine_dtype: str | None = None

    @classmethod
    def from_dict(cls, config: dict | PolicyConfig) -> PolicyConfig:
        if isinstance(config, PolicyConfig):
            config = dataclasses.asdict(config)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(config) - known)
        if unknown:
            raise ValueError(f"PolicyActor.setup: unknown config field(s) {unknown}; known: {sorted(known)}")
        cfg = cls(**config)
        if cfg.backend not in BACKENDS:
            raise ValueError(f"PolicyActor.setup: backend={cfg.backend!r}, expected one of {BACKENDS}")
        if cfg.lr_scheduler_type == "constant_with_warmup":
            cfg.lr_scheduler_type = "constant"
        if cfg.lr_scheduler_type not in ("cosine", "linear", "constant"):
            raise ValueError(f"PolicyActor.setup: lr_scheduler_type={cfg.lr_scheduler_type!r}, "
                             "expected cosine, linear or constant")
        if cfg.total_steps < 1:
            raise ValueError(f"PolicyActor.setup: total_steps={cfg.total_steps}, must be >= 1")
        if cfg.max_nonfinite_steps < 0:
            raise ValueError(f"PolicyActor.setup: max_nonfinite_steps={cfg.max_nonfinite_steps}, must be >= 0")
        cfg.adam_betas = tuple(cfg.adam_betas)
        return cfg

    def num_warmup_steps(self) -> int:
        """As transformers: warmup_steps if > 0, else ceil(warmup_ratio * total_steps)."""
        return self.warmup_steps if self.warmup_steps > 0 else math.ceil(self.warmup_ratio * self.total_steps)


def lr_lambda(kind: str, warmup_steps: int, total_steps: int) -> Callable[[int], float]:
    """LR multiplier per step, as transformers' get_{cosine,linear,constant}_schedule_with_warmup."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return step / max(1, warmup_steps)
        if kind == "constant":
            return 1.0
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        if kind == "linear":
            return max(0.0, 1.0 - progress)
        return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))

    return factor


def _fetch(item: Any) -> Any:
    return ray.get(item) if isinstance(item, ray.ObjectRef) else item


class PolicyActor(DistributedWorker):
    """One rank of the policy group. Call `setup(config)` on every rank first."""

    def __init__(self) -> None:
        self.backend = None

    # --- construction --------------------------------------------------------------------
    def setup(self, config: dict | PolicyConfig) -> dict:
        """Load the model, wrap it in the backend, build AdamW and the LR schedule."""
        cfg = PolicyConfig.from_dict(config)
        self.cfg = cfg
        _ensure_process_group()
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.backend = None  # free a previous setup's model before loading the next
        gc.collect()
        _seed_everything(cfg.seed)
        self.device = torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
        module = self._load_module(cfg)
        self.num_params = sum(p.numel() for p in module.parameters())
        counts = {"num_params": self.num_params,
                  "num_trainable_params": sum(p.numel() for p in module.parameters() if p.requires_grad)}
        make_optimizer = adamw_factory(cfg.learning_rate, cfg.weight_decay, cfg.adam_betas, cfg.adam_epsilon)
        self.backend = make_backend(cfg.backend, module, make_optimizer, max_grad_norm=cfg.max_grad_norm,
                                    device=self.device, deepspeed=cfg.deepspeed or "zero2",
                                    fsdp_reshard_after_forward=cfg.fsdp_reshard_after_forward,
                                    fsdp_offload=cfg.fsdp_offload)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.backend.optimizer, lr_lambda(cfg.lr_scheduler_type, cfg.num_warmup_steps(), cfg.total_steps)
        )
        self.global_step = 0  # optimizer steps taken (skipped non-finite steps do not count)
        self.nonfinite_in_row = 0
        self.nonfinite_total = 0
        return counts

    def _load_module(self, cfg: PolicyConfig) -> torch.nn.Module:
        """The model this role trains (a subclass may load another kind: a critic's value model)."""
        return load_model(
            cfg.model_dir, torch_dtype=cfg.torch_dtype, attn_impl=cfg.attn_impl,
            gradient_checkpointing=cfg.gradient_checkpointing, train_type=cfg.train_type, adapters=cfg.adapters,
            lora_rank=cfg.lora_rank, lora_alpha=cfg.lora_alpha, lora_dropout=cfg.lora_dropout,
            target_modules=cfg.target_modules, modules_to_save=cfg.modules_to_save,
            use_liger_kernel=cfg.use_liger_kernel, seed=cfg.seed, head=cfg.head,
        )

    # --- training and evaluation ----------------------------------------------------------
    def train_step(self, micro_batches: list | ray.ObjectRef, loss_fn: LossFn,
                   with_entropy: bool = False, with_logits: bool = False) -> dict[str, float]:
        """One optimizer step over this rank's micro-batches (gradient accumulation).

        with_entropy: loss_fn's batch also gets `entropies` [B, T-1], each next-token
        distribution's entropy (no gradient), for algorithms that log or use it.
        with_logits: loss_fn's batch also gets `logits` [N, V] at the loss positions (module docstring).

        Returns global metrics, the same on every rank: loss (loss_fn's losses summed over
        micro-batches and ranks: the global mean when loss_fn divides by num_tokens_global),
        token_acc (argmax == label over loss tokens), num_tokens, grad_norm (before clipping),
        lr (used by this step), skipped_nonfinite (1.0 when the step was skipped), and loss_fn's
        own metrics averaged over ranks x micro-batches.

        A step whose loss (on any rank) or gradient norm is not finite changes nothing: weights,
        optimizer state and LR schedule stay as they were, on every rank. The
        max_nonfinite_steps-th such step in a row raises instead.
        """
        batches = self._fetch_batches(micro_batches)
        num_tokens = self._global_num_tokens(batches)
        self.backend.train(True)
        lr = self.scheduler.get_last_lr()[0]
        loss_sum, correct, extra = 0.0, 0, {}
        for i, batch in enumerate(batches):
            with self.backend.micro_step(is_last=i == len(batches) - 1):
                batch, logprobs, mask, n_correct = self._forward(batch, with_entropy, with_logits)
                loss, metrics = loss_fn(logprobs, {**batch, "loss_mask": mask}, num_tokens)
                # Backends average gradients over ranks; the loss is already a global mean.
                scaled = loss * self.world_size
                if not torch.isfinite(loss.detach()):
                    # Make every gradient NaN: the gradient norm (a global reduction) is then not
                    # finite on every rank, and each backend's step skips the update.
                    scaled = scaled * float("nan")
                self.backend.backward(scaled)
            loss_sum += loss.item()
            correct += int(n_correct)
            _accumulate(extra, metrics)
        grad_norm = self.backend.step()
        out = self._reduce(loss_sum, correct, extra, len(batches), num_tokens)
        skipped = not math.isfinite(grad_norm)
        if skipped:
            self._count_nonfinite(out["loss"], grad_norm)
        else:
            self.nonfinite_in_row = 0
            self.scheduler.step()
            self.global_step += 1
        return {**out, "num_tokens": num_tokens, "grad_norm": grad_norm, "lr": lr,
                "skipped_nonfinite": float(skipped)}

    def _count_nonfinite(self, loss: float, grad_norm: float) -> None:
        self.nonfinite_in_row += 1
        self.nonfinite_total += 1
        limit = self.cfg.max_nonfinite_steps
        where = f"optimizer step {self.global_step + 1}: loss={loss}, grad_norm={grad_norm}"
        if limit and self.nonfinite_in_row >= limit:
            raise FloatingPointError(
                f"PolicyActor: {where} is not finite, {self.nonfinite_in_row} step(s) in a row "
                f"(max_nonfinite_steps={limit}); stopping. The weights are those of the last finite step; "
                "look for inf/NaN rewards or data, or lower the learning rate"
            )
        if self.rank == 0:
            logging.getLogger("swiftray").warning(
                "PolicyActor: %s is not finite; skipped the update (%d in a row, %d in all)",
                where, self.nonfinite_in_row, self.nonfinite_total)

    @torch.no_grad()
    def eval_step(self, micro_batches: list | ray.ObjectRef, loss_fn: LossFn) -> dict[str, float]:
        """Loss and token accuracy over this rank's micro-batches, reduced over ranks; no update."""
        batches = self._fetch_batches(micro_batches)
        num_tokens = self._global_num_tokens(batches)
        self.backend.train(False)
        loss_sum, correct, extra = 0.0, 0, {}
        for batch in batches:
            batch, logprobs, mask, n_correct = self._forward(batch)
            loss, metrics = loss_fn(logprobs, {**batch, "loss_mask": mask}, num_tokens)
            loss_sum += loss.item()
            correct += int(n_correct)
            _accumulate(extra, metrics)
        return {**self._reduce(loss_sum, correct, extra, len(batches), num_tokens), "num_tokens": num_tokens}

    @torch.no_grad()
    def compute_logprobs(self, batch: dict | list | ray.ObjectRef) -> torch.Tensor | list[torch.Tensor]:
        """Token log-probs [B, T-1] on CPU (zero where labels are -100), in eval mode.

        Without "labels", every next token is scored except padding. Accepts one batch or a
        list of micro-batches (then returns a list); every rank must pass the same number.
        """
        batch = _fetch(batch)
        batches = self._fetch_batches(batch if isinstance(batch, list) else [batch])
        self.backend.train(False)
        logprobs = [self._forward(b)[1].cpu() for b in batches]
        return logprobs if isinstance(batch, list) else logprobs[0]

    @torch.no_grad()
    def annotate(self, batch: Any) -> Any:
        """Collective: this rank's slice of the rollouts (a RolloutBatch) with `annotations["logprobs"]`,
        each completion token's log-prob under the current weights; forward_batch_size rows at a time."""
        self.backend.train(False)
        size = self.cfg.forward_batch_size
        values = []
        for start in range(0, len(batch), size):
            prompts, completions = batch.prompt_ids[start:start + size], batch.completion_ids[start:start + size]
            rows = sequences_batch(prompts, completions, pad_token_id=0)
            logprobs = self._forward(rows)[1].cpu()
            values += tokens_to_completion_values(logprobs, [len(p) for p in prompts], [len(c) for c in completions])
        batch.annotations["logprobs"] = values
        return batch

    def _fetch_batches(self, micro_batches: list | ray.ObjectRef) -> list[dict]:
        """ray.get what is a reference, and check the shape of what arrives."""
        if self.backend is None:
            raise RuntimeError("PolicyActor: call setup(config) on every rank first")
        batches = [_fetch(b) for b in _fetch(micro_batches)]
        if not batches:
            raise ValueError("PolicyActor: got an empty list of micro-batches")
        for i, batch in enumerate(batches):
            if not isinstance(batch, dict) or not isinstance(batch.get("input_ids"), torch.Tensor):
                keys = list(batch) if isinstance(batch, dict) else type(batch).__name__
                raise ValueError(f"PolicyActor: micro-batch {i} must be a dict with an 'input_ids' tensor "
                                 f"[B, T], got {keys}")
        return batches

    def _forward(self, batch: dict, with_entropy: bool = False, with_logits: bool = False
                 ) -> tuple[dict, torch.Tensor, torch.Tensor, torch.Tensor]:
        batch = {k: v.to(self.device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        labels = batch.get("labels")
        if labels is None:
            labels = batch["input_ids"]
            if "attention_mask" in batch and batch["attention_mask"].dim() == 2:
                labels = labels.masked_fill(batch["attention_mask"] == 0, -100)
        if labels.shape != batch["input_ids"].shape:
            raise ValueError(f"PolicyActor: labels shape {tuple(labels.shape)} != input_ids shape "
                             f"{tuple(batch['input_ids'].shape)}")
        if self.cfg.head == "score":  # each row's score at its last non-pad token (right-padded rows)
            inputs = {k: batch[k] for k in ("input_ids", "attention_mask") if k in batch}
            scores = self.backend.forward(inputs)[:, 0].float()
            return batch, scores, labels[:, 1:] != -100, torch.zeros((), dtype=torch.long)
        logits = prompt_sharing.shared_forward(self.backend.forward, batch, self.backend.module, self.num_params)
        if logits is None:  # the head runs only where a label is: logits [N, V]
            with logits_at(self.backend.module, labels[:, 1:] != -100):
                logits = self.backend.forward({k: batch[k] for k in MODEL_INPUTS if k in batch})
        logprobs, mask, correct = token_logprobs(logits, labels)
        if with_entropy:
            batch["entropies"] = token_entropy(logits, mask)
        if with_logits:
            batch["logits"] = logits if logits.dim() == 2 else logits[:, :-1][mask]
        return batch, logprobs, mask, correct

    def _global_num_tokens(self, batches: list[dict]) -> int:
        """Loss tokens over all ranks; also checks every rank has as many micro-batches (else FSDP hangs)."""
        local = sum(int((b["labels"][:, 1:] != -100).sum()) for b in batches if "labels" in b)
        tokens = torch.tensor([local], dtype=torch.float64)
        counts = torch.tensor([len(batches), -len(batches)], dtype=torch.float64)
        dist.all_reduce(tokens)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        if counts[0] != -counts[1]:
            raise ValueError(f"PolicyActor: ranks got different numbers of micro-batches "
                             f"({int(-counts[1])}..{int(counts[0])}); every rank needs the same number")
        return int(tokens.item())

    def _reduce(self, loss_sum: float, correct: int, extra: dict, num_micro: int, num_tokens: int
                ) -> dict[str, float]:
        """Sum loss and correct tokens over ranks; average loss_fn metrics over (rank, micro-batch)."""
        keys = sorted(extra)
        values = torch.tensor([loss_sum, correct] + [extra[k] for k in keys], dtype=torch.float64)
        dist.all_reduce(values)
        out = {"loss": values[0].item(), "token_acc": values[1].item() / max(1, num_tokens)}
        out.update({k: values[2 + i].item() / (num_micro * self.world_size) for i, k in enumerate(keys)})
        return out

    # --- checkpoints and weights -------------------------------------------------------------
    def save_checkpoint(self, path: str, save_only_model: bool = False) -> str:
        """Rank 0 writes the weights as safetensors (full model, or the adapter for LoRA/DoRA);
        unless save_only_model, also the training state (train_state.py: safetensors + JSON, the
        whole optimizer state gathered by name), and every rank its RNG state."""
        state = self.backend.full_state_dict()  # collective gather for FSDP2 / ZeRO-3
        if self.rank == 0:
            os.makedirs(path, exist_ok=True)
            self.backend.module.save_pretrained(path, state_dict=state)
        del state
        if not save_only_model:
            folder = os.path.join(path, "train_state")
            weights, optim, groups = self.backend.gather_train_state()  # collective
            error = None
            if self.rank == 0:
                meta = {"global_step": self.global_step, "world_size": self.world_size,
                        "backend": self.backend.name, "param_groups": train_state.to_json(groups),
                        "scheduler": train_state.to_json(self.scheduler.state_dict()),
                        "nonfinite_in_row": self.nonfinite_in_row, "nonfinite_total": self.nonfinite_total}
                error = _attempt(train_state.write, folder, meta, weights, optim)
            del weights, optim
            _all_ranks_succeed(error)  # also: the folder exists before other ranks write into it
            _all_ranks_succeed(_attempt(train_state.write_rng, folder, self.rank))
        dist.barrier()
        return path

    def load_checkpoint(self, path: str) -> int:
        """Restore weights, optimizer, scheduler and RNG from save_checkpoint(path); returns the step.

        The actor must be set up with the same model and train type; the number of ranks and the
        backend may differ from the run that saved it (the state is whole and keyed by name). Every
        file is read and checked before anything changes; a problem on any rank fails all of them
        with the same message (naming the file).
        """
        try:
            meta = train_state.read_meta(path)
            weights, optim = train_state.read_tensors(path, self.backend.trainable_names())
            rng = train_state.read_rng(path, self.rank, meta["world_size"])
            error = None
        except (OSError, ValueError) as err:
            error = err
        _all_ranks_succeed(error)
        if meta["world_size"] != self.world_size and self.rank == 0:
            logging.getLogger("swiftray").info("%s: saved by %d ranks, resumed by %d", path, meta["world_size"],
                                               self.world_size)
        return self._restore(meta, weights, optim, rng)

    def _restore(self, meta: dict, weights: dict, optim: dict, rng: dict) -> int:
        """Collective: put a read or snapshotted training state in place; returns its step."""
        groups = [train_state.from_json_group(g) for g in meta["param_groups"]]
        self.backend.restore_train_state(weights, optim, groups, meta["global_step"])  # collective
        del weights, optim
        self.scheduler.load_state_dict(meta["scheduler"])
        for group, lr in zip(self.backend.optimizer.param_groups, self.scheduler.get_last_lr()):
            group["lr"] = lr  # the LR of the next step, whatever the groups held before
        self.global_step = meta["global_step"]
        self.nonfinite_in_row = int(meta.get("nonfinite_in_row", 0))
        self.nonfinite_total = int(meta.get("nonfinite_total", 0))
        train_state.set_rng(rng)
        dist.barrier()
        return self.global_step

    def snapshot(self) -> dict[str, Any]:
        """The training state in memory, as save_checkpoint writes it to train_state/: rank 0's holds the
        weights, optimizer and scheduler state, every rank's its RNG state. The driver keeps the refs
        (the objects live in Ray's store) and hands them to restore_snapshot when a rank is lost."""
        weights, optim, groups = self.backend.gather_train_state()  # collective
        rng = train_state.get_rng()
        if self.rank != 0:
            return {"rng": rng}
        meta = {"global_step": self.global_step, "world_size": self.world_size, "backend": self.backend.name,
                "param_groups": train_state.to_json(groups), "scheduler": train_state.to_json(self.scheduler.state_dict()),
                "nonfinite_in_row": self.nonfinite_in_row, "nonfinite_total": self.nonfinite_total}
        return {"meta": meta, "weights": {k: v.detach().cpu().clone() for k, v in weights.items()},
                "optim": {k: {n: t.detach().cpu().clone() if isinstance(t, torch.Tensor) else t
                              for n, t in state.items()} for k, state in optim.items()}, "rng": rng}

    def restore_snapshot(self, own: dict[str, Any], state: dict[str, Any]) -> int:
        """Collective: go back to a snapshot (this rank's `own` for its RNG, rank 0's `state` for the
        rest); as many ranks as took it."""
        return self._restore(state["meta"], state["weights"], state["optim"], own["rng"])

    def export_weights(self, bucket_bytes: int = 64 << 20, merge_lora: bool = True,
                       shared_memory: bool = False) -> list[ray.ObjectRef] | list[dict]:
        """Full weights for rollout engines: rank 0 returns ObjectRefs of dict[name, CPU tensor]
        buckets of about bucket_bytes each (other ranks return []).

        shared_memory=True (rollouts on this node): rank 0 instead copies the weights into one of its
        two shared-memory buffers (alternately) and returns [handle] (see shared_weights.py);
        RolloutActor.update_weights takes either form. Its hf engine keeps using the buffer after the
        call, so the caller must not export again before every rollout has loaded this export (the
        driver's sync_weights waits for all of them). Without room for the buffers in /dev/shm, it
        falls back to the object store.

        Names are the plain model's. For LoRA/DoRA the adapter is merged into the base
        weights (merge_lora=True, what an engine without PEFT loads); merge_lora=False gives
        the adapter's own weights as PEFT saves them.
        """
        state = self._engine_state(merge_lora)
        if state is None:
            return []
        if shared_memory and shared_weights.available() and getattr(self, "_shared_writer", None) is not False:
            if getattr(self, "_shared_writer", None) is None:
                self._shared_writer = shared_weights.SharedWeightsWriter()
            try:
                return [self._shared_writer.write(state)]
            except MemoryError as err:
                logging.getLogger("swiftray").warning("%s; syncing weights through the object store", err)
                self._shared_writer.close()
                self._shared_writer = False
        buckets: list[dict[str, torch.Tensor]] = [{}]
        size = 0
        for name, tensor in state.items():
            if size >= bucket_bytes:
                buckets.append({})
                size = 0
            buckets[-1][name] = tensor.detach().cpu().contiguous()
            size += tensor.numel() * tensor.element_size()
        return [ray.put(bucket) for bucket in buckets if bucket]

    def _engine_state(self, merge_lora: bool = True) -> dict[str, torch.Tensor] | None:
        """Collective: the weights engines load, on rank 0 (None elsewhere); see export_weights."""
        state = self.backend.full_state_dict()
        if self.rank != 0:
            return None
        if self.backend.is_peft:
            if merge_lora:
                state = peft_to_base_state_dict(self.backend.module, state)
            else:
                from peft import get_peft_model_state_dict

                state = get_peft_model_state_dict(self.backend.module, state_dict=state)
        return cast_for_engines(state, self.cfg.engine_dtype)

    def join_weight_group(self, master_addr: str, master_port: int, size: int, backend: str, epoch: int) -> None:
        """Rank 0: open the weight-broadcast group (rank 0 of it) on the address weight_group_address gave."""
        from swiftray.actors.collective_sync import WeightBroadcast

        listen, self._store_socket = getattr(self, "_store_socket", None), None
        self._weight_group = None  # a previous group's sockets go first
        self._weight_group = WeightBroadcast(master_addr, master_port, 0, size, backend, epoch, listen_socket=listen)

    def broadcast_weights(self, version: int, bucket_bytes: int = 64 << 20) -> int:
        """Collective over the policy's ranks: rank 0 broadcasts the engines' weights (versioned, in buckets)
        to the engines of its weight-broadcast group; returns the bytes sent (0 on other ranks)."""
        state = self._engine_state()
        if state is None:
            return 0
        if getattr(self, "_weight_group", None) is None:
            raise RuntimeError("PolicyActor.broadcast_weights: join_weight_group first")
        return self._weight_group.send(state, version, bucket_bytes)

    def offload(self, model: bool = True, optimizer: bool = True, gc_collect: bool = False) -> None:
        """Colocated mode, while the engines generate: move the weights (--offload_model) and/or the
        optimizer state (--offload_optimizer) to CPU memory, then, with gc_collect
        (--gc_collect_after_offload), collect garbage and empty the CUDA cache. A no-op on CPU."""
        self.backend.offload(model=model, optimizer=optimizer)
        if gc_collect:
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()

    def onload(self) -> None:
        """Before training: bring back what offload() moved."""
        self.backend.onload()


def cast_for_engines(state: dict[str, torch.Tensor], engine_dtype: str | None) -> dict[str, torch.Tensor]:
    """The policy's weights in the rollout engines' dtype (--rollout_dtype; None: as they are): cast on the
    policy's side, so that a bf16 engine of an fp32 policy is sent half the bytes. Integer buffers stay."""
    if engine_dtype is None:
        return state
    dtype = getattr(torch, engine_dtype)
    return {name: t.to(dtype) if t.is_floating_point() else t for name, t in state.items()}


def _accumulate(into: dict, metrics: dict) -> None:
    for key, value in (metrics or {}).items():
        into[key] = into.get(key, 0.0) + float(value)


def _attempt(func: Callable, *args: Any) -> Exception | None:
    """Run func; return the file error it raised (to share with the other ranks) instead of raising it."""
    try:
        func(*args)
    except (OSError, ValueError) as err:
        return err
    return None


def _all_ranks_succeed(error: Exception | None) -> None:
    """Collective: raise on every rank if any rank failed, with the lowest failing rank's message.

    A rank that raised alone would leave the others waiting in the next collective."""
    world = dist.get_world_size()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else None
    first = torch.tensor([dist.get_rank() if error is not None else world], dtype=torch.int64, device=device)
    dist.all_reduce(first, op=dist.ReduceOp.MIN)
    source = int(first.item())
    if source == world:
        return
    message = f"{error}".encode() if source == dist.get_rank() else b""
    header = torch.tensor([len(message), int(isinstance(error, FileNotFoundError))], dtype=torch.int64, device=device)
    dist.broadcast(header, src=source)
    data = torch.zeros(int(header[0]), dtype=torch.uint8, device=device)
    if message:
        data.copy_(torch.frombuffer(bytearray(message), dtype=torch.uint8))
    dist.broadcast(data, src=source)
    if error is not None and source == dist.get_rank():
        raise error
    kind = FileNotFoundError if header[1] else ValueError
    raise kind(bytes(data.cpu().tolist()).decode())


def _ensure_process_group() -> None:
    """Outside an ActorGroup (a plain process), act as a group of one."""
    if dist.is_initialized():
        return
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1"}.items():
        os.environ.setdefault(key, value)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
