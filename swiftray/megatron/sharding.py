"""Which slice of which canonical tensor each of this rank's parameters is; load, and gather to rank 0.

A rank's GPTModel holds its pipeline stage's layers (numbered from 0 locally), its EP rank's
experts (numbered from 0 locally) and its TP/ETP slice of each matrix. `pieces()` names, for
every local parameter, the canonical tensor (`hf_map.py`) and the slice:

    whole  norms, the router: the same on every TP rank
    rows   embedding, output layer, linear_qkv: contiguous chunks of dim 0 (qkv: whole KV groups)
    cols   linear_proj, linear_fc2: contiguous chunks of dim 1
    glu    linear_fc1 = [gate; up]: rank r holds [gate chunk r; up chunk r]

Loading slices canonical tensors; gathering concatenates the pieces that one designated
rank per piece sends (data-parallel rank 0, and TP rank 0 for whole tensors) to global rank 0
over point-to-point messages. Manifests travel as JSON in byte tensors, never as pickles.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Callable

import torch
import torch.distributed as dist

from swiftray.megatron.hf_map import ModelShape

_LAYER = re.compile(r"^decoder\.layers\.(\d+)\.(.+)$")
_LOCAL_EXPERT = re.compile(r"^mlp\.experts\.local_experts\.(\d+)\.(linear_fc[12]\.weight)$")
_GROUPED_EXPERT = re.compile(r"^mlp\.experts\.(linear_fc[12])\.weight(\d+)$")  # TransformerEngine grouped GEMM
_LAYER_KIND = {
    "input_layernorm.weight": ("input_layernorm.weight", "whole"),
    "self_attention.linear_qkv.layer_norm_weight": ("input_layernorm.weight", "whole"),  # TE fuses the norm
    "self_attention.linear_qkv.weight": ("self_attention.linear_qkv.weight", "rows"),
    "self_attention.q_layernorm.weight": ("self_attention.q_layernorm.weight", "whole"),
    "self_attention.k_layernorm.weight": ("self_attention.k_layernorm.weight", "whole"),
    "self_attention.linear_proj.weight": ("self_attention.linear_proj.weight", "cols"),
    "pre_mlp_layernorm.weight": ("pre_mlp_layernorm.weight", "whole"),
    "mlp.linear_fc1.layer_norm_weight": ("pre_mlp_layernorm.weight", "whole"),  # TE fuses the norm
    "mlp.linear_fc1.weight": ("mlp.linear_fc1.weight", "glu"),
    "mlp.linear_fc2.weight": ("mlp.linear_fc2.weight", "cols"),
    "mlp.router.weight": ("mlp.router.weight", "whole"),
}


@dataclasses.dataclass(frozen=True)
class Piece:
    canonical: str
    kind: str  # whole | rows | cols | glu
    part: int
    parts: int
    owner: bool  # this rank sends this piece when the full model is gathered


def pieces(model: torch.nn.Module, shape: ModelShape, first_layer: int) -> dict[str, Piece]:
    """Local parameter name -> Piece, for this rank's (unwrapped) GPTModel."""
    from megatron.core import parallel_state as ps

    tp, tp_rank = ps.get_tensor_model_parallel_world_size(), ps.get_tensor_model_parallel_rank()
    etp, etp_rank = ps.get_expert_tensor_parallel_world_size(), ps.get_expert_tensor_parallel_rank()
    dense_dp0 = ps.get_data_parallel_rank() == 0
    expert_dp0 = ps.get_expert_data_parallel_rank() == 0 if shape.is_moe else dense_dp0
    experts_per_rank = shape.num_experts // ps.get_expert_model_parallel_world_size() if shape.is_moe else 0
    expert_offset = ps.get_expert_model_parallel_rank() * experts_per_rank

    def dense(canonical: str, kind: str, owner: bool = True) -> Piece:
        n, r = (1, 0) if kind == "whole" else (tp, tp_rank)
        return Piece(canonical, kind, r, n, owner and dense_dp0 and (kind != "whole" or tp_rank == 0))

    out: dict[str, Piece] = {}
    for name, _ in model.named_parameters():
        if name == "embedding.word_embeddings.weight":
            out[name] = dense(name, "rows")
        elif name == "output_layer.weight":
            # Tied weights on a last stage of its own: a copy of the embedding, which stage 0 owns.
            out[name] = dense("embedding.word_embeddings.weight" if shape.tied else name, "rows", owner=not shape.tied)
        elif name == "decoder.final_layernorm.weight":
            out[name] = dense(name, "whole")
        elif m := _LAYER.match(name):
            prefix = f"decoder.layers.{first_layer + int(m.group(1))}."
            rest = m.group(2)
            if rest in _LAYER_KIND:
                leaf, kind = _LAYER_KIND[rest]
                out[name] = dense(prefix + leaf, kind)
            elif e := (_LOCAL_EXPERT.match(rest) or _GROUPED_EXPERT.match(rest)):
                if e.re is _LOCAL_EXPERT:
                    local, leaf = int(e.group(1)), e.group(2)
                else:
                    local, leaf = int(e.group(2)), e.group(1) + ".weight"
                kind = "glu" if leaf.startswith("linear_fc1") else "cols"
                canonical = f"{prefix}mlp.experts.local_experts.{expert_offset + local}.{leaf}"
                out[name] = Piece(canonical, kind, etp_rank, etp, expert_dp0)
            else:
                raise KeyError(f"Megatron model parameter {name!r} has no HF counterpart in swiftray's map")
        else:
            raise KeyError(f"Megatron model parameter {name!r} has no HF counterpart in swiftray's map")
    return out


def take(full: torch.Tensor, piece: Piece) -> torch.Tensor:
    """This piece's slice of the full canonical tensor."""
    if piece.parts == 1 or piece.kind == "whole":
        return full
    if piece.kind == "rows":
        return full.chunk(piece.parts, dim=0)[piece.part]
    if piece.kind == "cols":
        return full.chunk(piece.parts, dim=1)[piece.part]
    gate, up = full.chunk(2, dim=0)
    return torch.cat([gate.chunk(piece.parts, dim=0)[piece.part], up.chunk(piece.parts, dim=0)[piece.part]])


def merge(parts: list[torch.Tensor], kind: str) -> torch.Tensor:
    """The full canonical tensor from its pieces in part order (inverse of take)."""
    if len(parts) == 1 or kind == "whole":
        return parts[0]
    if kind == "rows":
        return torch.cat(parts, dim=0)
    if kind == "cols":
        return torch.cat(parts, dim=1)
    halves = [p.chunk(2, dim=0) for p in parts]
    return torch.cat([torch.cat([h[0] for h in halves]), torch.cat([h[1] for h in halves])])


@torch.no_grad()
def load_weights(model: torch.nn.Module, layout: dict[str, Piece], get: Callable[[str], torch.Tensor]) -> int:
    """Copy each local parameter's slice of its canonical tensor (read through `get`); returns how many."""
    cache: dict[str, torch.Tensor] = {}
    count = 0
    for name, param in model.named_parameters():
        piece = layout[name]
        if piece.canonical not in cache:
            cache = {piece.canonical: get(piece.canonical)}  # keep one: tied weights ask twice in a row at most
        value = take(cache[piece.canonical], piece)
        if tuple(value.shape) != tuple(param.shape):
            raise ValueError(f"{piece.canonical}: slice {piece.part + 1}/{piece.parts} has shape "
                             f"{tuple(value.shape)}, the model's {name} has {tuple(param.shape)}")
        param.data.copy_(value.to(param.dtype))
        count += 1
    return count


# --- gathering to rank 0 --------------------------------------------------------------------
def all_gather_json(value: object, group: dist.ProcessGroup | None = None) -> list:
    """Every rank's JSON-serialisable `value`, in rank order (byte tensors, no pickle)."""
    device = _comm_device()  # nccl moves only GPU tensors
    data = torch.tensor(list(json.dumps(value).encode("utf-8")), dtype=torch.uint8)
    world = dist.get_world_size(group)
    sizes = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(world)]
    dist.all_gather(sizes, torch.tensor([data.numel()], dtype=torch.int64, device=device), group=group)
    longest = int(max(s.item() for s in sizes))
    padded = torch.zeros(longest, dtype=torch.uint8)
    padded[:data.numel()] = data
    chunks = [torch.zeros(longest, dtype=torch.uint8, device=device) for _ in range(world)]
    dist.all_gather(chunks, padded.to(device), group=group)
    return [json.loads(bytes(c[:int(s.item())].cpu().tolist()).decode("utf-8")) for c, s in zip(chunks, sizes)]


def _comm_device() -> torch.device:
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


@torch.no_grad()
def gather_full(model: torch.nn.Module, layout: dict[str, Piece]) -> dict[str, torch.Tensor]:
    """Collective: the whole canonical state on global rank 0 as CPU tensors ({} on other ranks)."""
    params = dict(model.named_parameters())
    mine = sorted((p.canonical, p.part, name) for name, p in layout.items() if p.owner)
    manifest = [[c, part, layout[name].parts, layout[name].kind, list(params[name].shape),
                 str(params[name].dtype).removeprefix("torch.")] for c, part, name in mine]
    manifests = all_gather_json(manifest)
    if dist.get_rank() != 0:
        device = _comm_device()
        for _, _, name in mine:
            tensor = params[name].detach().to(device).contiguous()
            dist.send(tensor.view(-1).view(torch.uint8), dst=0)
        return {}
    device = _comm_device()
    collected: dict[str, dict[int, torch.Tensor]] = {}
    kinds: dict[str, tuple[str, int]] = {}
    for src, entries in enumerate(manifests):
        for (c, part, parts, kind, shape, dtype), local in zip(entries, mine if src == 0 else entries):
            kinds[c] = (kind, parts)
            if src == 0:
                tensor = params[local[2]].detach().cpu().clone()
            else:
                tensor = torch.empty(shape, dtype=getattr(torch, dtype), device=device)
                dist.recv(tensor.view(-1).view(torch.uint8), src=src)
                tensor = tensor.cpu()
            collected.setdefault(c, {})[part] = tensor
    out = {}
    for c, got in collected.items():
        kind, n = kinds[c]
        if sorted(got) != list(range(n)):
            raise RuntimeError(f"gather: {c} arrived in pieces {sorted(got)} of {n}")
        out[c] = merge([got[i] for i in range(n)], kind)
    return out
