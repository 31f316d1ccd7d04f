"""int8 rollout weights on CPU (`--rollout_quantization int8`): the hf engine multiplies with an int8 copy
of each linear weight.

Decoding a few rows at a time reads every weight once per token, so on a CPU it is bound by memory
bandwidth: an int8 copy is a quarter of the fp32 bytes (about 1.7-1.8x the fp32 engine's tokens/s at 8
completions of the benchmark's 26M model: benchmarks/RESULTS.md, section 4). Each weight gets one scale per output channel (absmax /
127); each call quantizes its input on the fly (fbgemm's dynamic int8 GEMM). The engine then samples
from a slightly different distribution than the fp32 policy, which is what the rollout correction
(`--rollout_importance_sampling_mode`) measures and corrects.

`Int8Linear` keeps the fp32 weight as its parameter (same name, same tensor, ties kept), so a weight
sync loads into it as before, and requantizes lazily on the first call after the weight changed
(a new tensor or an in-place write: data_ptr and version counter, as static_decode's packing does).
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import nn

SCHEMES = ("int8",)


def available() -> bool:
    """fbgemm's int8 kernels (x86 CPUs) are built into this torch."""
    return bool({"x86", "fbgemm"} & set(torch.backends.quantized.supported_engines))


def int8_pack(weight: torch.Tensor, bias: torch.Tensor | None = None) -> Any:
    """fbgemm's packed int8 copy of `weight` [out, in]: one scale per output channel (absmax / 127)."""
    weight = weight.float()
    scale = (weight.abs().amax(1).clamp(min=1e-12) / 127).double()
    with warnings.catch_warnings():  # torch flags its quantized tensors as deprecated; the kernels are not
        warnings.simplefilter("ignore")
        qweight = torch.quantize_per_channel(weight, scale, torch.zeros_like(scale, dtype=torch.long), 0, torch.qint8)
        return torch.ops.quantized.linear_prepack(qweight, bias.float() if bias is not None else None)


def int8_matmul(x: torch.Tensor, packed: Any) -> torch.Tensor:
    """x @ weight.T (+ bias) with a packed int8 weight; x is quantized per call. reduce_range: 7-bit
    activations, so that AVX2's 16-bit accumulation cannot saturate."""
    return torch.ops.quantized.linear_dynamic(x.float().contiguous(), packed, True).to(x.dtype)


class Int8Linear(nn.Module):
    """`linear`'s forward, with its weight quantized to int8 per output channel."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: state_dict names and tied weights unchanged
        self.bias = linear.bias
        self._packed: Any = None
        self._key: tuple[Any, ...] | None = None

    def _key_now(self) -> tuple[Any, ...]:
        tensors = [self.weight] + ([self.bias] if self.bias is not None else [])
        return tuple((t.data_ptr(), t._version) for t in tensors)

    def pack(self) -> None:
        """Quantize the current weight (a no-op while it is unchanged)."""
        key = self._key_now()
        if key != self._key:
            self._packed = int8_pack(self.weight.detach(), self.bias.detach() if self.bias is not None else None)
            self._key = key

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.pack()
        return int8_matmul(x, self._packed)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 per channel"


def quantize_linears(model: nn.Module, scheme: str = "int8") -> int:
    """Swap every nn.Linear of `model` (its decoder layers and output head) for an Int8Linear; returns
    how many. The model must be float32 on CPU."""
    if scheme not in SCHEMES:
        raise ValueError(f"rollout quantization {scheme!r}: expected one of {SCHEMES}")
    if not available():
        raise RuntimeError("--rollout_quantization int8 needs torch's fbgemm int8 kernels (an x86 CPU build); "
                           f"this torch has {torch.backends.quantized.supported_engines}")
    weight = next(model.parameters())
    if weight.device.type != "cpu" or weight.dtype != torch.float32:
        raise RuntimeError(f"--rollout_quantization int8: the engine's model must be float32 on CPU, "
                           f"not {weight.dtype} on {weight.device.type}")
    swapped = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear:
                setattr(parent, name, Int8Linear(child))
                swapped += 1
    return swapped
