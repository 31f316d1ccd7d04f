"""Build a megatron-core GPTModel for Qwen3 / Qwen3-MoE on this rank (its pipeline stage, TP/EP shards).

`init_parallel` arranges the ranks into TP x CP x EP x DP x PP groups (megatron-core's
parallel_state, order tp-cp-ep-dp-pp); `transformer_config` turns the HF config plus the
parallel and training options into a TransformerConfig; `build_model` makes this stage's
GPTModel with either megatron-core's local layer spec (CPU, or GPU without TransformerEngine)
or the TransformerEngine spec (GPU). On CPU every fusion is off and weights are made on the CPU.

The local spec's norm is `torch.nn.RMSNorm` behind megatron's wrapper, which refuses sequence
parallelism; `SequenceParallelRMSNorm` is the same norm without that refusal: under sequence
parallelism each TP rank normalises its own slice of the tokens, so its weight's gradient is
a partial sum, and the `sequence_parallel` tag makes megatron's finalize_model_grads sum it
over the TP group (q/k norms are summed by name: each TP rank holds only some heads).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
import torch.nn.functional as F

from swiftray.megatron.hf_map import ModelShape

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class Layout:
    """How ranks split the model: megatron-core's parallel sizes."""

    tp: int = 1
    pp: int = 1
    ep: int = 1
    etp: int = 1  # expert tensor parallel (ms-swift's default 1: experts are whole on each EP rank)
    sp: bool = False

    def check(self, world_size: int, shape: ModelShape) -> None:
        """A clear error for a layout the world or the model cannot take."""
        model_parallel = self.tp * self.pp
        if world_size % model_parallel:
            raise ValueError(f"world size {world_size} is not a multiple of tensor x pipeline parallel "
                             f"({self.tp} x {self.pp})")
        dp = world_size // model_parallel
        if self.ep > 1 and not shape.is_moe:
            raise ValueError(f"expert_model_parallel_size={self.ep} needs an MoE model ({shape.model_type} has no experts)")
        if (self.ep * self.etp) > 1 and (dp * self.tp) % (self.ep * self.etp):
            raise ValueError(f"expert_model_parallel_size x expert_tensor_parallel_size = {self.ep * self.etp} "
                             f"must divide data parallel x tensor parallel = {dp * self.tp}")
        if shape.is_moe and shape.num_experts % self.ep:
            raise ValueError(f"{shape.num_experts} experts do not split over expert_model_parallel_size={self.ep}")
        if shape.num_layers % self.pp:
            raise ValueError(f"{shape.num_layers} layers do not split over pipeline_model_parallel_size={self.pp}")
        if shape.num_kv_heads % self.tp or shape.num_heads % self.tp:
            raise ValueError(f"{shape.num_heads} heads / {shape.num_kv_heads} KV heads do not split over "
                             f"tensor_model_parallel_size={self.tp}")
        if shape.vocab_size % self.tp:
            raise ValueError(f"vocab size {shape.vocab_size} is not a multiple of tensor_model_parallel_size={self.tp}")
        if self.sp and self.tp == 1:
            raise ValueError("--sequence_parallel true needs tensor_model_parallel_size > 1")
        if shape.is_moe and self.tp > 1 and not self.sp:
            # megatron-core's own config check refuses it too (on GPU as well).
            raise ValueError("an MoE model with tensor_model_parallel_size > 1 needs --sequence_parallel true")

    def data_parallel_size(self, world_size: int) -> int:
        return world_size // (self.tp * self.pp)


def portable_tensor_pickles() -> None:
    """Keep tensors sent out of a Megatron process loadable where megatron-core is not imported.

    Importing megatron.core replaces torch.storage._load_from_bytes (what an unpickled tensor's storage
    is rebuilt with) by its own weights_only version, so every tensor pickled here (Ray results: log-probs,
    weight buckets) names megatron.core.safe_globals, which the driver and the rollout actors cannot (or
    should not) import. Naming it as torch's own function makes each side use its own loader.
    """
    import torch.storage

    loader = torch.storage._load_from_bytes
    if getattr(loader, "__module__", "torch.storage") != "torch.storage":
        loader.__module__, loader.__qualname__ = "torch.storage", "_load_from_bytes"


def init_parallel(layout: Layout, timeout_minutes: int = 30) -> None:
    """(Re)arrange this process group's ranks into megatron-core's parallel groups."""
    from megatron.core import parallel_state

    if parallel_state.model_parallel_is_initialized():
        parallel_state.destroy_model_parallel()
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
        distributed_timeout_minutes=timeout_minutes, create_gloo_process_groups=False,
    )


@dataclasses.dataclass(frozen=True)
class BuildOptions:
    """Training options that change how the model is built."""

    dtype: str = "float32"
    use_te: bool = False  # TransformerEngine layer spec (GPU)
    moe_aux_loss_coeff: float = 0.0
    moe_grouped_gemm: bool = False  # GPU with TransformerEngine only
    moe_token_dispatcher_type: str = "alltoall"
    moe_router_load_balancing_type: str = "aux_loss"
    moe_router_dtype: str | None = "fp32"
    moe_shared_expert_overlap: bool = False
    recompute_granularity: str | None = None  # full | selective | None
    recompute_method: str | None = None
    recompute_num_layers: int | None = None
    recompute_modules: tuple[str, ...] = ("core_attn",)
    use_flash_attn: bool = False  # GPU with TransformerEngine only
    fusions: bool = False  # GPU kernels (bias-activation, bias-dropout, masked softmax; grad-accum with TE)


def transformer_config(shape: ModelShape, layout: Layout, opts: BuildOptions) -> Any:
    from megatron.core.transformer import TransformerConfig
    from megatron.core.transformer.enums import AttnBackend

    dtype = DTYPES[opts.dtype]
    moe: dict[str, Any] = {}
    if shape.is_moe:
        moe = dict(
            num_moe_experts=shape.num_experts, moe_router_topk=shape.topk, moe_ffn_hidden_size=shape.moe_ffn_hidden_size,
            # Qwen3-MoE's norm_topk_prob: softmax over the top-k logits equals renormalised top-k probs.
            moe_router_pre_softmax=not shape.norm_topk_prob,
            moe_aux_loss_coeff=opts.moe_aux_loss_coeff, moe_grouped_gemm=opts.moe_grouped_gemm,
            moe_router_load_balancing_type=opts.moe_router_load_balancing_type,
            moe_router_dtype=opts.moe_router_dtype, moe_shared_expert_overlap=opts.moe_shared_expert_overlap,
            moe_layer_freq=[1 if m else 0 for m in shape.moe_layers],
        )
    recompute: dict[str, Any] = {}
    if opts.recompute_granularity in ("full", "selective"):
        recompute = dict(recompute_granularity=opts.recompute_granularity)
        if opts.recompute_granularity == "full":
            recompute.update(recompute_method=opts.recompute_method or "uniform",
                             recompute_num_layers=opts.recompute_num_layers or 1)
        else:
            recompute.update(recompute_modules=list(opts.recompute_modules))
    on_gpu = torch.cuda.is_available()
    return TransformerConfig(
        num_layers=shape.num_layers, hidden_size=shape.hidden_size, ffn_hidden_size=shape.ffn_hidden_size,
        num_attention_heads=shape.num_heads, num_query_groups=shape.num_kv_heads, kv_channels=shape.head_dim,
        normalization="RMSNorm", layernorm_epsilon=shape.norm_eps, qk_layernorm=True,
        add_bias_linear=False, add_qkv_bias=False, gated_linear_unit=True, activation_func=F.silu,
        hidden_dropout=0.0, attention_dropout=0.0,
        tensor_model_parallel_size=layout.tp, pipeline_model_parallel_size=layout.pp,
        expert_model_parallel_size=layout.ep, expert_tensor_parallel_size=layout.etp,
        sequence_parallel=layout.sp, variable_seq_lengths=layout.pp > 1,
        params_dtype=dtype, bf16=dtype == torch.bfloat16, fp16=dtype == torch.float16,
        pipeline_dtype=dtype, autocast_dtype=dtype,
        use_cpu_initialization=True, perform_initialization=False,
        bias_activation_fusion=opts.fusions and on_gpu, bias_dropout_fusion=opts.fusions and on_gpu,
        masked_softmax_fusion=opts.fusions and on_gpu, apply_rope_fusion=False, persist_layer_norm=False,
        gradient_accumulation_fusion=opts.fusions and on_gpu and opts.use_te,  # local layers need apex for it
        attention_backend=AttnBackend.flash if opts.use_flash_attn and opts.use_te else AttnBackend.auto,
        attention_softmax_in_fp32=True, deallocate_pipeline_outputs=False,
        # Checked for dense models too: the allgather default refuses variable_seq_lengths (PP).
        moe_token_dispatcher_type=opts.moe_token_dispatcher_type,
        mrope_section=[shape.head_dim // 2, 0, 0],  # see build_model
        **moe, **recompute,
    )


class SequenceParallelRMSNorm(torch.nn.RMSNorm):
    """torch's RMSNorm under megatron's norm signature, usable with sequence parallelism (see module doc)."""

    def __init__(self, config: Any, hidden_size: int, eps: float = 1e-5, **unused: Any) -> None:
        super().__init__(hidden_size, eps=eps, dtype=config.params_dtype)
        self.weight.sequence_parallel = bool(config.sequence_parallel)


def layer_spec(shape: ModelShape, config: Any, moe_layer: bool, use_te: bool) -> Any:
    """One transformer layer's module spec: dense MLP or routed experts."""
    from megatron.core.models.gpt import gpt_layer_specs

    experts = shape.num_experts if moe_layer else None
    if use_te:
        return gpt_layer_specs.get_gpt_layer_with_transformer_engine_spec(
            num_experts=experts, moe_grouped_gemm=config.moe_grouped_gemm, qk_layernorm=True)
    spec = gpt_layer_specs.get_gpt_layer_local_spec(num_experts=experts, moe_grouped_gemm=False, qk_layernorm=True,
                                                    normalization="RMSNorm")
    sub = spec.submodules
    sub.input_layernorm = SequenceParallelRMSNorm
    sub.pre_mlp_layernorm = SequenceParallelRMSNorm
    sub.self_attention.submodules.q_layernorm = SequenceParallelRMSNorm
    sub.self_attention.submodules.k_layernorm = SequenceParallelRMSNorm
    return spec


def stage_layers(config: Any) -> tuple[int, int]:
    """(first global layer index, number of layers) of this pipeline stage."""
    from megatron.core.transformer.transformer_block import get_num_layers_to_build
    from megatron.core.transformer.transformer_layer import get_transformer_layer_offset

    return get_transformer_layer_offset(config), get_num_layers_to_build(config)


def build_model(shape: ModelShape, config: Any, use_te: bool = False) -> Any:
    """This pipeline stage's GPTModel (weights uninitialised: load them with sharding.load_weights)."""
    from megatron.core import parallel_state
    from megatron.core.models.gpt import GPTModel
    from megatron.core.transformer.transformer_block import TransformerBlockSubmodules

    first, count = stage_layers(config)
    moe_layers = shape.moe_layers or (False,) * shape.num_layers
    specs = [layer_spec(shape, config, moe_layers[first + i], use_te) for i in range(count)]
    if use_te:
        from megatron.core.extensions.transformer_engine import TENorm

        final_norm = TENorm
    else:
        final_norm = SequenceParallelRMSNorm
    block = TransformerBlockSubmodules(layer_specs=specs, layer_norm=final_norm)
    model = GPTModel(
        config=config, transformer_layer_spec=block, vocab_size=shape.vocab_size,
        max_sequence_length=shape.max_position_embeddings,
        pre_process=parallel_state.is_pipeline_first_stage(), post_process=parallel_state.is_pipeline_last_stage(),
        parallel_output=True, share_embeddings_and_output_weights=shape.tied,
        # 'mrope' with the same positions on its three axes is plain RoPE applied at each token's own
        # position id: packed rows restart positions per sample, which 'rope' (0..S-1) cannot express.
        position_embedding_type="mrope", rotary_base=int(shape.rope_theta),
    )
    if torch.cuda.is_available():
        model.cuda(torch.cuda.current_device())
    return model
