"""The Megatron policy backend: megatron-core (TP, PP, EP, SP, DistributedOptimizer) behind PolicyActor's calls.

    cpu_shim.py     megatron-core's CUDA assumptions answered on a machine without CUDA
    hf_map.py       Qwen3 / Qwen3-MoE names and layouts: HF <-> megatron-core (canonical, unsharded)
    convert.py      HF <-> megatron-core folders on disk (swiftray export --to_mcore / --to_hf)
    model.py        parallel groups, TransformerConfig and this rank's GPTModel
    sharding.py     each rank's slices of the canonical tensors: load, and gather to rank 0
    batch.py        micro-batches to model inputs; vocab-parallel log-probs, entropies, argmax
    train_state.py  per-rank optimizer / schedule / RNG state for resuming
    arguments.py, sft.py, command.py   `swiftray megatron sft`

The actor itself is swiftray/actors/megatron_policy.py. Nothing here imports megatron.core at
module level: the CPU shim must run first.
"""
