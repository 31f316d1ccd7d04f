"""Run megatron-core on a machine without CUDA: every CUDA assumption it makes, answered in one place.

megatron-core is written for GPUs. Its model, DDP buffers, DistributedOptimizer, pipeline
schedules and MoE dispatchers work on CPU tensors over gloo once a handful of assumptions hold
(measured: ../shared/DESIGN.md, "megatron-core on CPU"):

- tensors made with `device="cuda"` / `torch.cuda.current_device()` / `.cuda()`: a torch
  function mode maps every such device to the CPU (about 50 call sites, all covered at once);
- `param.type() == "torch.cuda.FloatTensor"` checks (DistributedOptimizer): the mode answers
  `Tensor.type()` with the CUDA name of the same dtype;
- `torch.cuda.current_device/synchronize/empty_cache`, streams, events, nvtx: no-ops;
- the CUDA RNG state tracker (model-parallel dropout seeds): CPU generator states instead;
- the gradient norm's fallback for apex's fused l2 norm: an accurate float64 sum of squares;
- gloo's all_to_all takes split sizes as lists, the MoE dispatcher hands it tensors;
- one MoE module (paged stash) imports triton unconditionally: a stand-in module that fails
  only if its kernels are ever launched (they are a GPU memory feature, never used here).

`install()` applies the patches, once per process, and only when CUDA is unavailable; it must run
before `megatron.core` is first imported. `device_mode()` is the function mode, entered around
every call into megatron code (modes are per thread). Nothing here is imported by swiftray's other backends,
so their processes never see it.
"""

from __future__ import annotations

import contextlib
import importlib.util
import logging
import sys
import types
import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch.overrides import TorchFunctionMode

_INSTALLED = False

# Tensor.type() names DistributedOptimizer checks, per dtype.
_CUDA_TYPE_NAMES = {
    torch.float32: "torch.cuda.FloatTensor",
    torch.float16: "torch.cuda.HalfTensor",
    torch.bfloat16: "torch.cuda.BFloat16Tensor",
}
_TENSOR_CUDA_METHODS = {torch.Tensor.cuda, torch.Tensor.pin_memory}
_CPU = torch.device("cpu")


def needed() -> bool:
    """True where the shim applies: no usable CUDA device in this process."""
    return not torch.cuda.is_available()


def _to_cpu_device(device: Any) -> Any:
    """`device` with any CUDA device (name, torch.device, or bare index) replaced by the CPU."""
    if isinstance(device, torch.device):
        return _CPU if device.type == "cuda" else device
    if isinstance(device, str):
        return "cpu" if device.startswith("cuda") else device
    if isinstance(device, int) and not isinstance(device, bool):
        return "cpu"  # a bare index means a CUDA device in torch's factories
    return device


class CudaToCpuMode(TorchFunctionMode):
    """Map CUDA devices to the CPU in every torch call; answer CUDA type names for CPU tensors."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = dict(kwargs or {})
        if func in _TENSOR_CUDA_METHODS:
            return args[0]
        if func is torch.Tensor.type and len(args) == 1 and not kwargs:
            tensor = args[0]
            if tensor.device.type == "cpu" and tensor.dtype in _CUDA_TYPE_NAMES:
                return _CUDA_TYPE_NAMES[tensor.dtype]
        if "device" in kwargs:
            kwargs["device"] = _to_cpu_device(kwargs["device"])
        if func is torch.Tensor.to and len(args) > 1:
            args = (args[0], *(_to_cpu_device(a) if not isinstance(a, torch.dtype) else a for a in args[1:]))
        return func(*args, **kwargs)


class _NullStream:
    """Stands in for torch.cuda.Stream: work on CPU is already ordered."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.device = _CPU

    def wait_stream(self, *args: Any, **kwargs: Any) -> None: ...
    def wait_event(self, *args: Any, **kwargs: Any) -> None: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool:
        return True

    def record_event(self, event: Any = None) -> _NullEvent:
        return event or _NullEvent()

    def __enter__(self) -> _NullStream:
        return self

    def __exit__(self, *exc: Any) -> None: ...

    @staticmethod
    def priority_range() -> tuple[int, int]:
        return (0, 0)


class _NullEvent:
    """Stands in for torch.cuda.Event."""

    def __init__(self, *args: Any, **kwargs: Any) -> None: ...
    def record(self, *args: Any, **kwargs: Any) -> None: ...
    def wait(self, *args: Any, **kwargs: Any) -> None: ...
    def synchronize(self) -> None: ...
    def query(self) -> bool:
        return True

    def elapsed_time(self, other: Any) -> float:
        return 0.0


def _patch_torch_cuda() -> None:
    cuda = torch.cuda
    null_stream = _NullStream()
    # "cpu", not an index: megatron passes it as `device=`, also inside custom autograd backward
    # functions, which run while the function mode is off (a mode is off while it handles a call,
    # here torch.autograd.backward).
    cuda.current_device = lambda: "cpu"
    cuda.synchronize = lambda *a, **k: None
    cuda.empty_cache = lambda: None
    cuda.Stream = _NullStream
    cuda.Event = _NullEvent
    cuda.current_stream = lambda *a, **k: null_stream
    cuda.default_stream = lambda *a, **k: null_stream
    cuda.stream = lambda *a, **k: contextlib.nullcontext()
    cuda.set_stream = lambda *a, **k: None
    cuda.is_current_stream_capturing = lambda: False
    cuda.memory_allocated = lambda *a, **k: 0
    cuda.memory_reserved = lambda *a, **k: 0
    cuda.max_memory_allocated = lambda *a, **k: 0
    # The "CUDA" RNG is the CPU one here (see install_rng_tracker); seeding it is the tracker's job.
    cuda.manual_seed = lambda seed: None
    cuda.manual_seed_all = lambda seed: None
    cuda.get_rng_state = lambda *a, **k: torch.get_rng_state()
    cuda.set_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    nvtx = types.SimpleNamespace(range_push=lambda *a, **k: None, range_pop=lambda *a, **k: None,
                                 range=lambda *a, **k: contextlib.nullcontext(), mark=lambda *a, **k: None)
    cuda.nvtx = nvtx


def _stub_triton_module() -> None:
    """megatron.core imports the paged-stash triton kernels at import time; triton is GPU-only."""
    name = "megatron.core.transformer.moe.ops.paged_stash"
    if importlib.util.find_spec("triton") is not None or name in sys.modules:
        return
    stub = types.ModuleType(name)
    stub.__doc__ = "swiftray CPU stand-in: the paged-stash triton kernels need a GPU"

    def _unavailable(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("MoE paged stash needs triton and a GPU; it is off on CPU")

    stub.GLOBAL_BLOCK_SIZE = 1024
    stub.paged_stash_copy_kernel = _unavailable
    stub.paged_stash_pop_kernel = _unavailable
    sys.modules[name] = stub


def _gloo_all_to_all_lists() -> None:
    """gloo's all_to_all_single wants Python lists of split sizes; megatron passes tensors at times."""
    original = dist.all_to_all_single
    if getattr(original, "_swiftray_shim", False):
        return

    def all_to_all_single(output, input, output_split_sizes=None, input_split_sizes=None, *args, **kwargs):
        if isinstance(output_split_sizes, torch.Tensor):
            output_split_sizes = output_split_sizes.tolist()
        if isinstance(input_split_sizes, torch.Tensor):
            input_split_sizes = input_split_sizes.tolist()
        return original(output, input, output_split_sizes, input_split_sizes, *args, **kwargs)

    all_to_all_single._swiftray_shim = True
    dist.all_to_all_single = all_to_all_single


def _quiet_cpu_warnings() -> None:
    """Warnings megatron-core gives on every CPU run, about GPU libraries and GPU tuning: nothing to act on."""
    for message in ("Transformer Engine and Apex are not installed", "When using sequence parallelism it is recommended",
                    "The .grad attribute of a Tensor that is not a leaf", "MimoModelConfig is experimental",
                    "full scope is deprecated", "Apex is not installed",
                    r"`torch.distributed.(reduce_scatter_tensor|all_gather_into_tensor)` is deprecated"):
        warnings.filterwarnings("ignore", message=message)
    # Said once per model build: GPTModel's move to HybridModel; DDP computing its buffer layout itself.
    logging.getLogger("megatron.core.models.gpt.gpt_model").setLevel(logging.ERROR)
    logging.getLogger("megatron.core.distributed.distributed_data_parallel").setLevel(logging.ERROR)


def install_megatron_patches() -> None:
    """After megatron.core is imported: the CPU RNG tracker, and an accurate gradient norm."""
    _install_rng_tracker()
    _accurate_l2_norm()


def _accurate_l2_norm() -> None:
    """megatron's fallback for apex's multi_tensor_l2norm takes torch.norm of each fp32 tensor, which on
    CPU was measured 4e-5 off for a [2000, 128] gradient (a blocked fp32 reduction): enough to make the
    same gradients report different norms when TP splits the tensor differently. Sum squares in float64."""
    from megatron.core.optimizer import clip_grads

    def l2_norm(chunk_size, noop_flag, tensor_lists, per_tensor, *args):
        total = sum(t.detach().double().pow(2).sum() for t in tensor_lists[0])
        return torch.as_tensor(total, dtype=torch.float64).sqrt().float().reshape(1), None

    clip_grads.l2_norm_impl = l2_norm


def _install_rng_tracker() -> None:
    """Replace megatron's CUDA RNG tracker by one over CPU generator states."""
    from megatron.core.tensor_parallel import random as mrandom

    class CpuRNGStatesTracker(mrandom.CudaRNGStatesTracker):
        """Named RNG states (data-parallel, model-parallel, expert) kept as CPU generator states."""

        def add(self, name: str, seed: int) -> None:
            self._is_initialized = True
            if seed in self.seeds_:
                raise Exception(f"seed {seed} already exists")
            if name in self.states_:
                raise Exception(f"rng state {name} already exists")
            self.seeds_.add(seed)
            self.states_[name] = torch.Generator().manual_seed(seed).get_state()

        @contextlib.contextmanager
        def fork(self, name: str = mrandom._MODEL_PARALLEL_RNG_TRACKER_NAME):
            if name not in self.states_:
                raise Exception(f"rng state {name} is not added")
            outer = torch.get_rng_state()
            torch.set_rng_state(self.states_[name])
            try:
                yield
            finally:
                self.states_[name] = torch.get_rng_state()
                torch.set_rng_state(outer)

    mrandom._get_cuda_rng_state = lambda *a, **k: torch.get_rng_state()
    mrandom._set_cuda_rng_state = lambda state, *a, **k: torch.set_rng_state(state)
    mrandom._CUDA_RNG_STATE_TRACKER = CpuRNGStatesTracker()
    mrandom._CUDA_RNG_STATE_TRACKER_INITIALIZED = True


def install() -> bool:
    """Apply the shim in this process if there is no CUDA; returns whether it is active. Idempotent."""
    global _INSTALLED
    if _INSTALLED:
        return True
    if not needed():
        return False
    if "megatron.core" in sys.modules and "megatron.core.transformer.moe.ops.paged_stash" not in sys.modules:
        raise RuntimeError("swiftray.megatron.cpu_shim.install() must run before megatron.core is imported")
    _stub_triton_module()
    _quiet_cpu_warnings()
    _patch_torch_cuda()
    _gloo_all_to_all_lists()
    _INSTALLED = True
    return True


def active() -> bool:
    return _INSTALLED


def device_mode() -> contextlib.AbstractContextManager:
    """The CUDA-to-CPU function mode where the shim is active (else a no-op). Torch function modes
    are per thread, so every entry point that runs megatron code enters it."""
    return CudaToCpuMode() if _INSTALLED else contextlib.nullcontext()
