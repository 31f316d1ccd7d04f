"""Qwen3 and Qwen3-MoE weights: Hugging Face names <-> megatron-core's, tensor by tensor.

The megatron side is the model's *canonical* state: the names and shapes a `GPTModel` built
with megatron-core's local layer spec has at TP = PP = EP = 1 (layers numbered globally,
experts by their global index). Sharding for TP/PP/EP happens when a rank loads
(`sharding.py`); files only ever hold canonical or HF tensors.

    HF (checkpoint names)                          megatron-core (canonical)
    model.embed_tokens.weight                      embedding.word_embeddings.weight
    model.layers.L.input_layernorm.weight          decoder.layers.L.input_layernorm.weight
    model.layers.L.self_attn.{q,k,v}_proj.weight   decoder.layers.L.self_attention.linear_qkv.weight
    model.layers.L.self_attn.o_proj.weight         decoder.layers.L.self_attention.linear_proj.weight
    model.layers.L.self_attn.{q,k}_norm.weight     decoder.layers.L.self_attention.{q,k}_layernorm.weight
    model.layers.L.post_attention_layernorm.weight decoder.layers.L.pre_mlp_layernorm.weight
    model.layers.L.mlp.{gate,up}_proj.weight       decoder.layers.L.mlp.linear_fc1.weight      (dense)
    model.layers.L.mlp.down_proj.weight            decoder.layers.L.mlp.linear_fc2.weight      (dense)
    model.layers.L.mlp.gate.weight                 decoder.layers.L.mlp.router.weight          (MoE)
    model.layers.L.mlp.experts.E.{gate,up}_proj    decoder.layers.L.mlp.experts.local_experts.E.linear_fc1.weight
    model.layers.L.mlp.experts.E.down_proj         decoder.layers.L.mlp.experts.local_experts.E.linear_fc2.weight
    model.norm.weight                              decoder.final_layernorm.weight
    lm_head.weight (untied only)                   output_layer.weight

linear_qkv holds, per KV group, that group's query heads, then its key head, then its value
head (megatron's interleaved layout, which TP splits by whole groups); linear_fc1 is
[gate; up]. Conversion is concatenation and slicing only, so a round trip is bit-exact.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from typing import Any

import torch

Getter = Callable[[str], torch.Tensor]
SUPPORTED = ("qwen3", "qwen3_moe")


@dataclasses.dataclass(frozen=True)
class ModelShape:
    """What the name map and the model builder need from an HF config.json."""

    model_type: str
    num_layers: int
    hidden_size: int
    ffn_hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    vocab_size: int
    tied: bool
    norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    num_experts: int = 0
    topk: int = 0
    moe_ffn_hidden_size: int = 0
    norm_topk_prob: bool = True
    moe_layers: tuple[bool, ...] = ()  # per layer: routed experts (True) or a dense MLP
    router_aux_loss_coef: float = 0.0

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0


def model_shape(config: dict[str, Any]) -> ModelShape:
    """ModelShape from a config.json dict (transformers 4 or 5 spelling); a clear error otherwise."""
    model_type = config.get("model_type")
    if model_type not in SUPPORTED:
        raise ValueError(f"config.json: model_type {model_type!r} is not supported by the Megatron backend "
                         f"(supported: {', '.join(SUPPORTED)})")
    if config.get("attention_bias"):
        raise ValueError("config.json: attention_bias=true is not supported (Qwen3 has no q/k/v bias)")
    rope = config.get("rope_parameters") or {}
    rope_scaling = config.get("rope_scaling") or {}
    kind = rope.get("rope_type") or rope_scaling.get("rope_type") or rope_scaling.get("type") or "default"
    if kind != "default":
        raise ValueError(f"config.json: rope_type {kind!r} is not supported (only plain RoPE)")
    num_layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    shape = dict(
        model_type=model_type, num_layers=num_layers, hidden_size=int(config["hidden_size"]),
        ffn_hidden_size=int(config["intermediate_size"]), num_heads=heads,
        num_kv_heads=int(config.get("num_key_value_heads") or heads),
        head_dim=int(config.get("head_dim") or config["hidden_size"] // heads),
        vocab_size=int(config["vocab_size"]), tied=bool(config.get("tie_word_embeddings", False)),
        norm_eps=float(config.get("rms_norm_eps", 1e-6)),
        rope_theta=float(rope.get("rope_theta") or config.get("rope_theta") or 10000.0),
        max_position_embeddings=int(config.get("max_position_embeddings", 4096)),
    )
    if model_type == "qwen3_moe":
        experts = int(config.get("num_experts") or config.get("num_local_experts") or 0)
        sparse_step = int(config.get("decoder_sparse_step", 1) or 1)
        dense_only = set(config.get("mlp_only_layers") or [])
        moe_layers = tuple(i not in dense_only and experts > 0 and (i + 1) % sparse_step == 0
                           for i in range(num_layers))
        if config.get("shared_expert_intermediate_size"):
            raise ValueError("config.json: shared experts are not supported (Qwen3-MoE has none)")
        shape.update(num_experts=experts, topk=int(config["num_experts_per_tok"]),
                     moe_ffn_hidden_size=int(config["moe_intermediate_size"]),
                     norm_topk_prob=bool(config.get("norm_topk_prob", False)), moe_layers=moe_layers,
                     router_aux_loss_coef=float(config.get("router_aux_loss_coef", 0.0)))
    return ModelShape(**shape)


# --- names -----------------------------------------------------------------------------------
def layer_prefix(layer: int) -> str:
    return f"decoder.layers.{layer}."


def canonical_names(shape: ModelShape) -> list[str]:
    """Every canonical tensor name, in model order."""
    names = ["embedding.word_embeddings.weight"]
    for layer in range(shape.num_layers):
        p = layer_prefix(layer)
        names += [p + "input_layernorm.weight", p + "self_attention.linear_qkv.weight",
                  p + "self_attention.q_layernorm.weight", p + "self_attention.k_layernorm.weight",
                  p + "self_attention.linear_proj.weight", p + "pre_mlp_layernorm.weight"]
        if shape.moe_layers and shape.moe_layers[layer]:
            names.append(p + "mlp.router.weight")
            for e in range(shape.num_experts):
                names += [f"{p}mlp.experts.local_experts.{e}.linear_fc1.weight",
                          f"{p}mlp.experts.local_experts.{e}.linear_fc2.weight"]
        else:
            names += [p + "mlp.linear_fc1.weight", p + "mlp.linear_fc2.weight"]
    names.append("decoder.final_layernorm.weight")
    if not shape.tied:
        names.append("output_layer.weight")
    return names


def canonical_shape(shape: ModelShape, name: str) -> tuple[int, ...]:
    """The full (unsharded) shape of a canonical tensor."""
    h, hd = shape.hidden_size, shape.head_dim
    if name.startswith("embedding.") or name == "output_layer.weight":
        return (shape.vocab_size, h)
    if ".local_experts." in name:
        ffn = shape.moe_ffn_hidden_size
        return (2 * ffn, h) if name.endswith("linear_fc1.weight") else (h, ffn)
    leaf = name.rsplit(".", 2)[-2]
    table = {
        "input_layernorm": (h,), "pre_mlp_layernorm": (h,), "final_layernorm": (h,),
        "q_layernorm": (hd,), "k_layernorm": (hd,),
        "linear_qkv": ((shape.num_heads + 2 * shape.num_kv_heads) * hd, h),
        "linear_proj": (h, shape.num_heads * hd),
        "router": (shape.num_experts, h),
        "linear_fc1": (2 * shape.ffn_hidden_size, h), "linear_fc2": (h, shape.ffn_hidden_size),
    }
    return table[leaf]


# --- q/k/v and gate/up layouts -----------------------------------------------------------------
def qkv_to_mcore(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, shape: ModelShape) -> torch.Tensor:
    """HF q/k/v projections -> megatron's per-group [q heads of the group; k; v] layout."""
    groups, hd, h = shape.num_kv_heads, shape.head_dim, q.shape[-1]
    per_group = shape.num_heads // groups
    q = q.reshape(groups, per_group * hd, h)
    k = k.reshape(groups, hd, h)
    v = v.reshape(groups, hd, h)
    return torch.cat([q, k, v], dim=1).reshape(-1, h)


def qkv_from_mcore(qkv: torch.Tensor, shape: ModelShape) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    groups, hd, h = shape.num_kv_heads, shape.head_dim, qkv.shape[-1]
    per_group = shape.num_heads // groups
    grouped = qkv.reshape(groups, (per_group + 2) * hd, h)
    q, k, v = grouped.split([per_group * hd, hd, hd], dim=1)
    return q.reshape(-1, h).contiguous(), k.reshape(-1, h).contiguous(), v.reshape(-1, h).contiguous()


# --- conversion ------------------------------------------------------------------------------
_SIMPLE_FROM_HF = {
    "input_layernorm.weight": "input_layernorm.weight",
    "self_attention.q_layernorm.weight": "self_attn.q_norm.weight",
    "self_attention.k_layernorm.weight": "self_attn.k_norm.weight",
    "self_attention.linear_proj.weight": "self_attn.o_proj.weight",
    "pre_mlp_layernorm.weight": "post_attention_layernorm.weight",
    "mlp.router.weight": "mlp.gate.weight",
    "mlp.linear_fc2.weight": "mlp.down_proj.weight",
}
_TOP_FROM_HF = {
    "embedding.word_embeddings.weight": "model.embed_tokens.weight",
    "decoder.final_layernorm.weight": "model.norm.weight",
    "output_layer.weight": "lm_head.weight",
}


def canonical_from_hf(name: str, get: Getter, shape: ModelShape) -> torch.Tensor:
    """One canonical tensor, built from the HF checkpoint tensors it comes from (read through `get`)."""
    if name in _TOP_FROM_HF:
        return get(_TOP_FROM_HF[name])
    if not name.startswith("decoder.layers."):
        raise KeyError(f"not a canonical tensor name: {name!r}")
    layer, rest = name.removeprefix("decoder.layers.").split(".", 1)
    hf = f"model.layers.{layer}."
    if rest in _SIMPLE_FROM_HF:
        return get(hf + _SIMPLE_FROM_HF[rest])
    if rest == "self_attention.linear_qkv.weight":
        attn = hf + "self_attn."
        return qkv_to_mcore(get(attn + "q_proj.weight"), get(attn + "k_proj.weight"), get(attn + "v_proj.weight"),
                            shape)
    if rest == "mlp.linear_fc1.weight":
        return torch.cat([get(hf + "mlp.gate_proj.weight"), get(hf + "mlp.up_proj.weight")])
    if rest.startswith("mlp.experts.local_experts."):
        expert, leaf = rest.removeprefix("mlp.experts.local_experts.").split(".", 1)
        ex = f"{hf}mlp.experts.{expert}."
        if leaf == "linear_fc1.weight":
            return torch.cat([get(ex + "gate_proj.weight"), get(ex + "up_proj.weight")])
        if leaf == "linear_fc2.weight":
            return get(ex + "down_proj.weight")
    raise KeyError(f"not a canonical tensor name: {name!r}")


def hf_to_canonical(get: Getter, shape: ModelShape) -> Iterator[tuple[str, torch.Tensor]]:
    """Every canonical (name, tensor) pair, from HF checkpoint tensors read by name through `get`."""
    for name in canonical_names(shape):
        yield name, canonical_from_hf(name, get, shape)


def canonical_to_hf(get: Getter, shape: ModelShape) -> Iterator[tuple[str, torch.Tensor]]:
    """HF checkpoint (name, tensor) pairs (per-expert names) from canonical tensors read through `get`."""
    yield "model.embed_tokens.weight", get("embedding.word_embeddings.weight")
    for layer in range(shape.num_layers):
        hf, mc = f"model.layers.{layer}.", layer_prefix(layer)
        yield hf + "input_layernorm.weight", get(mc + "input_layernorm.weight")
        q, k, v = qkv_from_mcore(get(mc + "self_attention.linear_qkv.weight"), shape)
        attn = hf + "self_attn."
        yield attn + "q_proj.weight", q
        yield attn + "k_proj.weight", k
        yield attn + "v_proj.weight", v
        yield attn + "q_norm.weight", get(mc + "self_attention.q_layernorm.weight")
        yield attn + "k_norm.weight", get(mc + "self_attention.k_layernorm.weight")
        yield attn + "o_proj.weight", get(mc + "self_attention.linear_proj.weight")
        yield hf + "post_attention_layernorm.weight", get(mc + "pre_mlp_layernorm.weight")
        if shape.moe_layers and shape.moe_layers[layer]:
            yield hf + "mlp.gate.weight", get(mc + "mlp.router.weight")
            for e in range(shape.num_experts):
                ex, src = f"{hf}mlp.experts.{e}.", f"{mc}mlp.experts.local_experts.{e}."
                gate, up = get(src + "linear_fc1.weight").chunk(2, dim=0)
                yield ex + "gate_proj.weight", gate.contiguous()
                yield ex + "up_proj.weight", up.contiguous()
                yield ex + "down_proj.weight", get(src + "linear_fc2.weight")
        else:
            gate, up = get(mc + "mlp.linear_fc1.weight").chunk(2, dim=0)
            yield hf + "mlp.gate_proj.weight", gate.contiguous()
            yield hf + "mlp.up_proj.weight", up.contiguous()
            yield hf + "mlp.down_proj.weight", get(mc + "mlp.linear_fc2.weight")
    yield "model.norm.weight", get("decoder.final_layernorm.weight")
    if not shape.tied:
        yield "lm_head.weight", get("output_layer.weight")


def fuse_experts_for_runtime(named: Iterator[tuple[str, torch.Tensor]], shape: ModelShape,
                             fused: bool) -> Iterator[tuple[str, torch.Tensor]]:
    """HF checkpoint names -> the names a live transformers model has (its state_dict).

    transformers 5 keeps a Qwen3-MoE layer's experts as two 3D parameters, `experts.gate_up_proj`
    [E, 2I, H] ([gate; up] per expert) and `experts.down_proj` [E, H, I], while checkpoints (and
    transformers 4) name each expert. fused=False passes names through. Tied models also get
    `lm_head.weight`, which a live model's state_dict lists.
    """
    pending: dict[str, dict[str, torch.Tensor]] = {}
    for name, tensor in named:
        if not fused or ".mlp.experts." not in name:
            yield name, tensor
            if name == "model.embed_tokens.weight" and shape.tied:
                yield "lm_head.weight", tensor
            continue
        prefix, rest = name.split(".mlp.experts.", 1)
        pending.setdefault(prefix, {})[rest] = tensor
        parts = pending[prefix]
        if len(parts) == 3 * shape.num_experts:
            experts = range(shape.num_experts)
            yield f"{prefix}.mlp.experts.gate_up_proj", torch.stack(
                [torch.cat([parts[f"{e}.gate_proj.weight"], parts[f"{e}.up_proj.weight"]]) for e in experts])
            yield f"{prefix}.mlp.experts.down_proj", torch.stack([parts[f"{e}.down_proj.weight"] for e in experts])
            del pending[prefix]
    if pending:
        raise RuntimeError(f"incomplete expert weights for {sorted(pending)}")
