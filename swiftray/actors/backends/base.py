"""What every training backend offers PolicyActor, and the part DDP and FSDP2 share.

A backend owns the wrapped model and the optimizer of one rank. PolicyActor drives it:

    with backend.micro_step(is_last):   # gradient sync only on the last micro-batch
        logits = backend.forward(inputs)
        backend.backward(loss)
    grad_norm = backend.step()          # clip, optimizer step, zero grads

Every backend averages gradients over ranks (that is what DDP, FSDP2 and ZeRO do);
PolicyActor scales the loss by the world size to turn that average into a sum.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_state_dict,
)

OptimizerFactory = Callable[[torch.nn.Module], torch.optim.Optimizer]


def adamw_factory(lr: float, weight_decay: float, betas: tuple[float, float], eps: float) -> OptimizerFactory:
    """torch AdamW over trainable params; biases and norm weights (ndim < 2) get no weight decay.

    fused=True (one kernel over all tensors): 18 ms against 62 ms a step for 26M parameters on a
    2-core CPU (benchmarks/findings.md); transformers' Trainer uses it too.
    """

    def make(module: torch.nn.Module) -> torch.optim.Optimizer:
        trainable = [p for p in module.parameters() if p.requires_grad]
        groups = [
            {"params": [p for p in trainable if p.ndim >= 2], "weight_decay": weight_decay},
            {"params": [p for p in trainable if p.ndim < 2], "weight_decay": 0.0},
        ]
        return torch.optim.AdamW([g for g in groups if g["params"]], lr=lr, betas=betas, eps=eps, fused=True)

    return make


class Backend:
    """Interface plus the torch-native implementation used by DDP and FSDP2."""

    name = "base"

    def __init__(self, module: torch.nn.Module, make_optimizer: OptimizerFactory, *, max_grad_norm: float,
                 device: torch.device) -> None:
        self.module = module  # the HF / PEFT model, for configs and save_pretrained
        self.device = device
        self.max_grad_norm = max_grad_norm
        self.is_peft = hasattr(module, "peft_config")
        self.model: torch.nn.Module = self._wrap(module.to(device))
        self.optimizer = make_optimizer(self.model)

    def _wrap(self, module: torch.nn.Module) -> torch.nn.Module:
        return module

    # --- one training step -------------------------------------------------------------
    def micro_step(self, is_last: bool) -> contextlib.AbstractContextManager:
        """Context for one micro-batch's forward+backward; gradients sync only when is_last."""
        return contextlib.nullcontext()

    def forward(self, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.model(**inputs, use_cache=False).logits

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self) -> float:
        """Clip (max_grad_norm <= 0: measure only), step the optimizer, zero grads; the pre-clip norm."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm of sharded grads is a partial DTensor
            norm = norm.full_tensor()
        if self.max_grad_norm and self.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(params, self.max_grad_norm, norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return norm.item()

    def train(self, mode: bool = True) -> None:
        self.model.train(mode)

    # --- state ---------------------------------------------------------------------------
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Collective: the unsharded weights on CPU, keyed like `module.state_dict()`, on rank 0 ({} elsewhere).

        The tensors may be the live weights themselves (not copies): read them, do not keep them.
        """
        from torch.distributed.tensor import DTensor

        if self.device.type == "cpu" and not any(isinstance(p, DTensor) for p in self.model.parameters()):
            # Every weight is whole and on CPU (DDP on CPU): that is the module's own state dict.
            # get_model_state_dict returns the same tensors (no copy) but spent 9-13 ms on bookkeeping
            # for the 91-tensor 26M benchmark model, about as long as the weight sync's one copy of them.
            return self.module.state_dict() if dist.get_rank() == 0 else {}
        state = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        return state if dist.get_rank() == 0 else {}

    def _state_options(self) -> StateDictOptions:
        # LoRA: only the adapter (trainable) weights are saved; the frozen base comes from model_dir.
        return StateDictOptions(ignore_frozen_params=self.is_peft, strict=not self.is_peft)

    def save_train_state(self, path: str) -> None:
        """Collective: trainable weights + optimizer state, sharded per rank (torch.distributed.checkpoint)."""
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self._state_options())
        dcp.save({"model": model_state, "optim": optim_state}, checkpoint_id=path)

    def load_train_state(self, path: str) -> None:
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=self._state_options())
        state = {"model": model_state, "optim": optim_state}
        dcp.load(state, checkpoint_id=path)
        set_state_dict(self.model, self.optimizer, model_state_dict=state["model"],
                       optim_state_dict=state["optim"], options=self._state_options())

    # --- memory for colocated roles --------------------------------------------------------
    def offload(self, model: bool = True, optimizer: bool = True) -> None:
        """Move the weights and/or the optimizer state to CPU memory (a no-op when training on CPU)."""
        self._offloaded = (model, optimizer)
        self._move(torch.device("cpu"), model, optimizer)

    def onload(self) -> None:
        """Bring back what offload() moved."""
        model, optimizer = getattr(self, "_offloaded", (False, False))
        self._move(self.device, model, optimizer)
        self._offloaded = (False, False)

    def _move(self, device: torch.device, model: bool, optimizer: bool) -> None:
        if self.device.type == "cpu":
            return
        if model:
            self.model.to(device)
        if optimizer:
            for state in self.optimizer.state.values():
                for key, value in state.items():
                    if isinstance(value, torch.Tensor) and key != "step":
                        state[key] = value.to(device, non_blocking=True)
        torch.cuda.synchronize()
