"""What every training backend offers PolicyActor, and the part DDP and FSDP2 share.

A backend owns the wrapped model and the optimizer of one rank. PolicyActor drives it:

    with backend.micro_step(is_last):   # gradient sync only on the last micro-batch
        logits = backend.forward(inputs)
        backend.backward(loss)
    grad_norm = backend.step()          # clip, optimizer step, zero grads

Every backend averages gradients over ranks (that is what DDP, FSDP2 and ZeRO do);
PolicyActor scales the loss by the world size to turn that average into a sum.

A step whose gradient norm is not finite changes nothing: `step` discards the gradients
and leaves weights and optimizer state as they were (the norm is global, so every rank
decides the same). The training state for checkpoints is gathered whole and keyed by
parameter name (`gather_train_state` / `restore_train_state`), so that it does not depend
on the number of ranks that saved it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
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
        """Clip (max_grad_norm <= 0: measure only), step the optimizer, zero grads; the pre-clip norm.

        A norm that is not finite (inf/NaN in some gradient) skips the update: grads are dropped."""
        params = [p for p in self.model.parameters() if p.grad is not None]
        grads = [p.grad for p in params]
        norm = torch.nn.utils.get_total_norm(grads)
        if hasattr(norm, "full_tensor"):  # FSDP2: the norm of sharded grads is a partial DTensor
            norm = norm.full_tensor()
        if not torch.isfinite(norm):
            self.optimizer.zero_grad(set_to_none=True)
            return norm.item()
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

    def gather_train_state(self) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, torch.Tensor]], list[dict]]:
        """Collective: (trainable weights, AdamW state per parameter, param groups), whole and on CPU,
        keyed by parameter name, on rank 0 (empty elsewhere). A param group is its hyperparameters
        plus "params": the names of its parameters. LoRA: only the adapter (the trainable part)."""
        options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
        model_state, optim_state = get_state_dict(self.model, self.optimizer, options=options)
        if dist.get_rank() != 0:
            return {}, {}, []
        groups = [{**{k: v for k, v in g.items() if k != "params"}, "params": list(g["params"])}
                  for g in optim_state["param_groups"]]
        names = [name for g in groups for name in g["params"]]
        return {name: model_state[name] for name in names}, dict(optim_state["state"]), groups

    def trainable_names(self) -> list[str]:
        """The names gather_train_state uses, in the optimizer's order."""
        names = {id(p): name for name, p in self.model.named_parameters()}
        return [_plain_name(names[id(p)]) for g in self.optimizer.param_groups for p in g["params"]]

    def restore_train_state(self, weights: dict[str, torch.Tensor], optim: dict[str, dict[str, torch.Tensor]],
                            param_groups: list[dict], step: int) -> None:
        """Collective: every rank passes the whole state (as gather_train_state returns it, from any
        number of ranks) and keeps its own shard of it."""
        options = StateDictOptions(full_state_dict=True, strict=False)
        if not optim:  # saved before the first optimizer step: there is no optimizer state yet
            set_model_state_dict(self.model, weights, options=options)
            return
        set_state_dict(self.model, self.optimizer, model_state_dict=weights,
                       optim_state_dict={"state": optim, "param_groups": param_groups}, options=options)

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


def _plain_name(name: str) -> str:
    """A parameter's name without the wrapper's prefix (DDP's `module.`), as state dicts name it."""
    return name.removeprefix("module.")
