"""The run plan: every flag resolved once into a typed, frozen description of a run.

    args (flags) --build_plan--> RunPlan --controller--> actors

For every role: how many workers, where they go (placement groups, bundles, CPUs, GPU fractions,
which roles share the policy's GPUs), the run's one dtype, and the role's own config, which is
all its actors ever receive. Beside the roles: the data, template, batch sizes, one schedule
(steps, logging, eval, save, best checkpoint, resume) for SFT and RL alike, and how an RL step
runs (colocated, separate or async; sleep and offload). A flag either changes the plan or is
listed in swiftray/compat.py; values are checked before Ray starts and before any folder is made.

`swiftray sft|rlhf ... --print_plan true` prints `describe(plan)` and exits.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from swiftray.actors.configs import RolloutConfig
from swiftray.actors.policy import PolicyConfig
from swiftray.algorithms.base import Algorithm, RoleSpec
from swiftray.arguments import ArgumentError, check_values
from swiftray.compat import compat_notes, refuse_unsupported
from swiftray.models.generation import SamplingParams
from swiftray.paths import absolute
from swiftray.placement import Cluster, Demand, Placement, lay_out
from swiftray.schedule import Schedule

DTYPE_ALIASES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


@dataclass(frozen=True)
class DataPlan:
    dataset: tuple[str, ...]
    val_dataset: tuple[str, ...]
    split_dataset_ratio: float
    num_proc: int
    shuffle: bool
    seed: int
    columns: tuple[tuple[str, str], ...]  # renames, old -> new
    strict: bool
    model_name: tuple[str, ...] | None
    model_author: tuple[str, ...] | None


@dataclass(frozen=True)
class TemplatePlan:
    template: str | None  # a named chat template or a file; None: the tokenizer's own
    system: str | None
    max_length: int | None
    truncation_strategy: str
    loss_scale: str
    packing: bool


@dataclass(frozen=True)
class BatchPlan:
    world_size: int  # policy ranks
    micro_batch_size: int  # rows per rank per micro-batch
    accumulation: int  # micro-batches per optimizer step
    eval_batch_size: int
    # RL: a step generates `completions_per_generation` completions (num_generations per prompt) and
    # trains `optimizer_steps_per_generation` optimizer steps of micro x ranks x accumulation each.
    num_generations: int = 0
    optimizer_steps_per_generation: int = 1
    rollout_batch_size: int = 0  # prompts per rollout call (the unit handed to an engine)

    @property
    def samples_per_optimizer_step(self) -> int:
        return self.micro_batch_size * self.world_size * self.accumulation

    @property
    def completions_per_generation(self) -> int:
        return self.samples_per_optimizer_step * self.optimizer_steps_per_generation

    @property
    def prompts_per_generation(self) -> int:
        return self.completions_per_generation // max(1, self.num_generations)


@dataclass(frozen=True)
class OutputPlan:
    output_dir: str
    add_version: bool
    report_to: tuple[str, ...]
    log_completions: bool = False


@dataclass(frozen=True)
class StepPlan:
    """How one RL step runs. mode: "colocated" (engines share the policy's devices: wake, generate,
    sleep, onload, train, sync, offload, in turn), "separate" (engines on devices of their own) or
    "async" (the next step's rollouts are generated while this one trains)."""

    mode: str
    sleep_level: int = 0
    offload_model: bool = False
    offload_optimizer: bool = False
    gc_collect_after_offload: bool = False
    sampling: SamplingParams | None = None
    eval_sampling: SamplingParams | None = None
    max_resample_times: int = 0


@dataclass(frozen=True)
class ClusterPlan:
    """How an RL run spreads and survives (controller/work.py, supervision.py, recovery.py).

    weight_sync: the transport rule, per engine: "auto" gives an engine on policy rank 0's node the
    shared-memory buffer and one elsewhere the broadcast (collective); the others force one transport
    for every engine ("shared_memory" falls back to the object store off rank 0's node)."""

    weight_sync: str = "auto"
    max_restarts: int = 3
    memory_checkpoint_steps: int = 0
    min_engines: int = 1
    max_engines: int = 1

    def transport(self, same_node_as_policy: bool, engine: str = "hf") -> str:
        """The weight-sync path of one engine."""
        if self.weight_sync == "auto":
            return "shared_memory" if same_node_as_policy and engine == "hf" else "collective"
        if self.weight_sync == "shared_memory" and not same_node_as_policy:
            return "object_store"
        return self.weight_sync


@dataclass(frozen=True)
class RolePlan:
    name: str
    actor: str  # "module:Class"
    config: Any  # what the role's actors are set up with
    placement: Placement
    phases: tuple[str, ...] = ()  # see algorithms/base.py; the policy and rollout have their own calls
    threads_share: float | None = None  # share of a node's cores for each worker's torch threads (CPU)
    data_ranks: tuple[int, ...] = ()  # the data shard of each worker (model-parallel peers share one); (): its rank


@dataclass(frozen=True)
class RunPlan:
    command: str  # sft | rlhf
    algorithm: Algorithm
    model: str
    dtype: str
    cluster: Cluster
    ray_address: str | None
    ray_bind_all_interfaces: bool  # a local Ray listens beyond loopback (so that nodes can join it)
    dist_backend: str  # the policy's torch.distributed backend: gloo | nccl
    data: DataPlan
    template: TemplatePlan
    batch: BatchPlan
    schedule: Schedule | None  # None until the training data is counted
    output: OutputPlan
    step: StepPlan
    roles: tuple[RolePlan, ...]
    groups: dict[str, tuple[dict[str, float], ...]]  # placement group name -> bundles
    notes: tuple[str, ...] = field(default=())  # printed once at the start (no-op flags, hardware)
    cluster_plan: ClusterPlan = field(default=ClusterPlan())

    def role(self, name: str) -> RolePlan | None:
        return next((r for r in self.roles if r.name == name), None)

    def roles_in(self, phase: str) -> list[RolePlan]:
        return [r for r in self.roles if phase in r.phases]


# ---------------------------------------------------------------------------------------- building


def resolve_dtype(name: str | None, model_dir: str | None, on_gpu: bool) -> str:
    """The run's one dtype. Unset or "auto": the checkpoint's on GPUs, float32 on CPU (CPU kernels are
    fastest and exact in float32, and the tests compare against float32 references)."""
    name = DTYPE_ALIASES.get(name, name)
    if name not in (None, "auto"):
        return name
    if not on_gpu:
        return "float32"
    config = os.path.join(model_dir or "", "config.json")
    found = None
    if os.path.isfile(config):
        with open(config, encoding="utf-8") as f:
            data = json.load(f)
        found = data.get("torch_dtype") or data.get("dtype")
    return DTYPE_ALIASES.get(found, found) if found in ("bfloat16", "float16", "float32", "bf16", "fp16") else "float32"


def cpu_has_fast_matmul(dtype: str) -> bool:
    """Whether this CPU multiplies `dtype` matrices in hardware (oneDNN's check: AVX-512 BF16/FP16 or AMX).
    Without it torch falls back to a reference loop: 1.3 GFLOP/s in bf16 against 79 in fp32 on one
    core of an EPYC without AVX-512 (2048 x 512 x 1536)."""
    import torch

    check = {"bfloat16": "_is_mkldnn_bf16_supported", "float16": "_is_mkldnn_fp16_supported"}.get(dtype)
    try:
        return check is None or bool(getattr(torch.ops.mkldnn, check)())
    except (AttributeError, RuntimeError):
        return True  # a torch without the check: say nothing rather than guess


def check_model_type(args: Any) -> None:
    """--model_type must agree with the checkpoint's config.json (the architecture comes from there)."""
    path = os.path.join(args.model or "", "config.json")
    if args.model_type is None or not os.path.isfile(path):
        return
    with open(path, encoding="utf-8") as f:
        found = json.load(f).get("model_type")
    if found and found != args.model_type:
        raise ArgumentError(f"--model_type {args.model_type}: {path} says model_type {found!r}; "
                            f"drop the flag or point --model at a {args.model_type} checkpoint")


def parse_fsdp(value: str | None, on_gpu: bool) -> dict[str, bool] | None:
    """ms-swift's --fsdp "full_shard auto_wrap offload" -> FSDP2 options; None: no FSDP."""
    if not value or value == "no":
        return None
    options = {"reshard_after_forward": True, "offload": False}
    for token in value.replace(",", " ").split():
        if token in ("full_shard", "auto_wrap"):  # auto_wrap: every transformer block is its own unit anyway
            continue
        if token == "shard_grad_op":
            options["reshard_after_forward"] = False
        elif token == "offload":
            if not on_gpu:
                raise ArgumentError("--fsdp offload: FSDP2's CPU offload needs GPUs (the policy already "
                                    "trains on CPU here)")
            options["offload"] = True
        else:
            raise ArgumentError(f"--fsdp {value!r}: unknown option {token!r}; expected full_shard or "
                                "shard_grad_op, optionally with auto_wrap and offload")
    return options


def parse_columns(value: str | dict | None) -> dict[str, str]:
    """--columns '{"old": "new"}' (a dict in a config file)."""
    if not value:
        return {}
    if isinstance(value, dict):
        return value
    try:
        columns = json.loads(value)
    except json.JSONDecodeError:
        columns = None
    if not isinstance(columns, dict):
        raise ArgumentError(f"--columns {value!r}: expected a JSON object like '{{\"old\": \"new\"}}'")
    return columns


def data_plan(args: Any) -> DataPlan:
    """The data flags (the same for every training command)."""
    return DataPlan(tuple(args.dataset), tuple(args.val_dataset), args.split_dataset_ratio, args.dataset_num_proc,
                    args.dataset_shuffle, args.data_seed, tuple(sorted(parse_columns(args.columns).items())),
                    args.strict, tuple(args.model_name) if args.model_name else None,
                    tuple(args.model_author) if args.model_author else None)


def template_plan(args: Any) -> TemplatePlan:
    return TemplatePlan(args.template, args.system, args.max_length, args.truncation_strategy, args.loss_scale,
                        args.packing)


def _rl_template(template: TemplatePlan) -> TemplatePlan:
    """RL trains on generated tokens: the SFT target and packing flags do not apply (compat.py lists them)."""
    return dataclasses.replace(template, loss_scale="default", packing=False)


def _field_default(args: Any, name: str) -> Any:
    f = type(args).__dataclass_fields__[name]
    return f.default if f.default is not dataclasses.MISSING else f.default_factory()


def check_deepspeed(value: str | None) -> None:
    """A --deepspeed JSON file must parse, before anything starts."""
    if value and os.path.isfile(value):
        try:
            with open(value, encoding="utf-8") as f:
                json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise ArgumentError(f"--deepspeed {value}: not valid JSON: {err}") from None


def _policy_config(args: Any, dtype: str, total_optimizer_steps: int, fsdp: dict | None,
                   head: str = "lm") -> PolicyConfig:
    backend = "deepspeed" if args.deepspeed else ("fsdp2" if fsdp is not None else "ddp")
    return PolicyConfig(
        model_dir=absolute(args.model), head=head, torch_dtype=dtype, attn_impl=args.attn_impl,
        gradient_checkpointing=args.gradient_checkpointing, use_liger_kernel=args.use_liger_kernel,
        train_type=args.train_type, adapters=[absolute(a) for a in args.adapters], lora_rank=args.lora_rank,
        lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=list(args.target_modules),
        modules_to_save=list(args.modules_to_save), backend=backend,
        deepspeed=absolute(args.deepspeed) if args.deepspeed else None,
        fsdp_reshard_after_forward=(fsdp or {}).get("reshard_after_forward", True),
        fsdp_offload=(fsdp or {}).get("offload", False),
        learning_rate=args.learning_rate, weight_decay=args.weight_decay,
        adam_betas=(args.adam_beta1, args.adam_beta2), max_grad_norm=args.max_grad_norm,
        lr_scheduler_type=args.lr_scheduler_type, warmup_ratio=args.warmup_ratio, warmup_steps=args.warmup_steps,
        total_steps=max(1, total_optimizer_steps), gradient_accumulation_steps=args.gradient_accumulation_steps,
        max_nonfinite_steps=args.max_nonfinite_steps, seed=args.seed,
        forward_batch_size=getattr(args, "local_rollout_forward_batch_size", 64))


def _rollout_dtype(args: Any, algorithm: Any, dtype: str) -> str:
    """The rollout engines' dtype (--rollout_dtype, else the run's); the rollout flags refused where
    nothing would act on them."""
    rollout_dtype = getattr(args, "rollout_dtype", None)
    mode = getattr(args, "rollout_importance_sampling_mode", None)
    if algorithm.data_source != "rollouts":
        for flag, value in (("rollout_dtype", rollout_dtype), ("rollout_importance_sampling_mode", mode)):
            if value is not None:
                raise ArgumentError(f"--{flag} {value}: {algorithm.name} generates no rollouts")
    elif mode is not None and not algorithm.uses_rollout_logprobs:
        raise ArgumentError(f"--rollout_importance_sampling_mode {mode}: {algorithm.name} has no rollout "
                            "correction (grpo, dapo and the GRPO estimators have)")
    return rollout_dtype or dtype


def _rollout_quantization(args: Any, algorithm: Any, rollout_dtype: str, on_gpu: bool) -> str | None:
    """--rollout_quantization, refused where the int8 engine cannot run."""
    scheme = getattr(args, "rollout_quantization", None)
    if scheme is None:
        return None
    from swiftray.models.int8_linear import available

    refusals = ((algorithm.data_source != "rollouts", f"{algorithm.name} generates no rollouts"),
                (args.use_vllm, "the hf engine's CPU path; vLLM quantizes by its own options (leave --use_vllm "
                                "off, or drop the flag)"),
                (on_gpu, "int8 decoding runs on CPU (fbgemm); on GPUs use vLLM"),
                (rollout_dtype != "float32", "the int8 linears take float32 activations, and the engines would run "
                                             f"in {rollout_dtype} (set --rollout_dtype float32)"),
                (not available(), "this torch build has no fbgemm int8 kernels (x86 CPUs only)"))
    for refused, why in refusals:
        if refused:
            raise ArgumentError(f"--rollout_quantization {scheme}: {why}")
    return scheme


def _rl_batch(args: Any, world: int, num_generations: int) -> BatchPlan:
    """TRL's and ms-swift's batch arithmetic: generation_batch_size = micro x ranks x steps_per_generation
    (unset: gradient_accumulation_steps x --num_mini_batches, TRL PPO's minibatches of one generation);
    `num_generations` completions per prompt (the algorithm's)."""
    per_micro_round = args.per_device_train_batch_size * world
    steps_per_generation = args.steps_per_generation
    if args.generation_batch_size is not None:
        if steps_per_generation is not None:
            raise ArgumentError("--generation_batch_size and --steps_per_generation are alternatives; pass one")
        if args.generation_batch_size % per_micro_round:
            raise ArgumentError(f"--generation_batch_size {args.generation_batch_size}: must be a multiple of "
                                f"per_device_train_batch_size x workers ({per_micro_round})")
        steps_per_generation = args.generation_batch_size // per_micro_round
    steps_per_generation = steps_per_generation or args.gradient_accumulation_steps * args.num_mini_batches
    if steps_per_generation % args.gradient_accumulation_steps:
        # name the flag the user passed: --steps_per_generation, or the one it was derived from
        given = (f"--generation_batch_size {args.generation_batch_size} (= {steps_per_generation} micro-batch rounds "
                 f"of per_device_train_batch_size x workers, {per_micro_round})"
                 if args.generation_batch_size is not None else f"--steps_per_generation {steps_per_generation}")
        raise ArgumentError(f"{given}: must give a multiple of --gradient_accumulation_steps "
                            f"{args.gradient_accumulation_steps} rounds (each generation feeds whole optimizer steps)")
    batch = BatchPlan(world_size=world, micro_batch_size=args.per_device_train_batch_size,
                      accumulation=args.gradient_accumulation_steps,
                      eval_batch_size=0,  # RL evaluation generates for every prompt in one round (compat.py)
                      num_generations=num_generations,
                      optimizer_steps_per_generation=steps_per_generation // args.gradient_accumulation_steps)
    if batch.completions_per_generation % num_generations:
        raise ArgumentError(
            f"completions per generation ({batch.completions_per_generation} = per_device_train_batch_size x "
            f"workers x steps_per_generation) must be a multiple of --num_generations {num_generations}")
    engines = args.num_infer_workers or 1
    rollout_batch = args.rollout_batch_size or -(-batch.prompts_per_generation // engines)
    return dataclasses.replace(batch, rollout_batch_size=rollout_batch)


def _step_plan(args: Any, colocated: bool, algorithm: Algorithm) -> StepPlan:
    if args.async_generate:
        mode = "async"
    else:
        mode = "colocated" if colocated else "separate"
    temperature = algorithm.default_temperature if args.temperature is None else args.temperature
    sampling = SamplingParams(max_new_tokens=args.max_completion_length, temperature=temperature,
                              top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                              n=algorithm.num_generations)
    greedy = SamplingParams(max_new_tokens=args.max_completion_length, temperature=0.0, n=1)
    return StepPlan(mode=mode, sleep_level=args.sleep_level, offload_model=args.offload_model,
                    offload_optimizer=args.offload_optimizer, gc_collect_after_offload=args.gc_collect_after_offload,
                    sampling=sampling, eval_sampling=greedy, max_resample_times=args.max_resample_times)


def _demand(spec: RoleSpec, world: int, on_gpu: bool) -> Demand:
    count = {"one": 1, "per_gpu": world if on_gpu else 1, "per_rank": world}[spec.scale]
    return Demand(spec.name, count, 1 if (on_gpu and spec.wants_gpu) else 0, spec.cpu_share)


def _with_dtype(config: Any, dtype: str) -> Any:
    """Role configs that leave torch_dtype unset take the run's dtype."""
    if dataclasses.is_dataclass(config) and getattr(config, "torch_dtype", "") is None:
        return dataclasses.replace(config, torch_dtype=dtype)
    return config


def build_plan(args: Any, algorithm: Algorithm, cluster: Cluster, train_units: int | None = None,
               command: str = "sft") -> RunPlan:
    """The plan of a run; `train_units` (samples or packs in SFT, prompts in RL) sizes the schedule.
    Raises ArgumentError, naming the flag, for anything that cannot run."""
    check_values(args)
    refuse_unsupported(args)
    check_model_type(args)
    check_deepspeed(args.deepspeed)
    on_gpu = cluster.gpus > 0
    world = args.world_size
    # Policy ranks that take data: all of them, but for a model-parallel trainer (Megatron) its DP size.
    data_world = getattr(args, "data_parallel_size", world)
    dtype = resolve_dtype(args.torch_dtype, args.model, on_gpu)
    if args.ddp_backend == "nccl" and not on_gpu:
        raise ArgumentError("--ddp_backend nccl needs GPUs; this cluster has none (gloo is the CPU backend)")
    fsdp = parse_fsdp(args.fsdp, on_gpu)
    rl = algorithm.data_source == "rollouts"
    rollout_dtype = _rollout_dtype(args, algorithm, dtype)
    rollout_quantization = _rollout_quantization(args, algorithm, rollout_dtype, on_gpu)
    if rl:
        batch = _rl_batch(args, data_world, algorithm.num_generations)
        if args.async_generate and algorithm.max_staleness < 1:
            raise ArgumentError(f"--async_generate: {algorithm.name} allows no stale rollouts")
    else:
        batch = BatchPlan(data_world, args.per_device_train_batch_size, args.gradient_accumulation_steps,
                          args.per_device_eval_batch_size)

    schedule = None
    if train_units is not None:
        per_step = batch.prompts_per_generation if rl else batch.samples_per_optimizer_step
        steps_per_epoch = -(-train_units // per_step)
        schedule = Schedule(
            total_steps=Schedule.total_for(args.max_steps, args.num_train_epochs, steps_per_epoch),
            steps_per_epoch=steps_per_epoch, logging_steps=args.logging_steps,
            logging_first_step=args.logging_first_step, eval_strategy=args.eval_strategy, eval_steps=args.eval_steps,
            save_strategy=args.save_strategy, save_steps=args.save_steps, save_total_limit=args.save_total_limit,
            save_only_model=args.save_only_model, metric_for_best_model=args.metric_for_best_model,
            resume_from_checkpoint=absolute(args.resume_from_checkpoint) if args.resume_from_checkpoint else None)
    total_optimizer_steps = (schedule.total_steps if schedule else 1) * (
        batch.optimizer_steps_per_generation * algorithm.num_iterations if rl else 1)

    # Who asks for what, then where it goes.
    cores = os.cpu_count() or 1
    demands = []
    if rl:
        tp = args.vllm_tensor_parallel_size if args.use_vllm else 1
        demands.append(Demand("rollout", args.num_infer_workers or 1, tp if on_gpu else 0, 0.5))
    demands += [_demand(spec, world, on_gpu) for spec in algorithm.role_specs]
    # RL: the policy takes half the cores, a dataset-fed run all of them, but never what its other roles
    # ask for (DPO's reference, PPO's critic and engines), so that every role fits on one machine.
    others = sum(d.num_workers * d.num_cpus for d in demands)
    policy_cpus = args.num_cpus_per_worker or max(0.5, round(min(cores * (0.5 if rl else 1.0), cores - others) / world, 2))
    layout = lay_out(cluster, Demand("policy", world, 1 if on_gpu else 0, policy_cpus), demands)
    colocated = "rollout" in layout.colocated or (rl and not on_gpu)
    async_generate = rl and args.async_generate
    if async_generate and on_gpu and "rollout" in layout.colocated:
        raise ArgumentError("--async_generate needs rollout engines on GPUs of their own; the cluster has only "
                            "the policy's GPUs for them (add GPUs or lower --num_infer_workers)")

    def share(sync_share: float) -> float | None:
        # CPU threads: synchronous steps run one role at a time on every core; async halves them.
        return None if on_gpu else sync_share * (0.5 if async_generate else 1.0)

    if hasattr(args, "policy_trainer"):  # another policy backend: `swiftray megatron rlhf` (megatron/rlhf.py)
        policy_actor, policy_config, data_ranks = args.policy_trainer(dtype, total_optimizer_steps, algorithm)
    else:
        policy_actor, data_ranks = "swiftray.actors.policy:PolicyActor", ()
        policy_config = _policy_config(args, dtype, total_optimizer_steps, fsdp, algorithm.policy_head)
    if rollout_dtype != dtype:  # the policy casts its weights for the engines before a sync
        policy_config = dataclasses.replace(policy_config, engine_dtype=rollout_dtype)
    roles = [RolePlan("policy", policy_actor, policy_config, layout.placements["policy"],
                      # roles take turns with the cores (RL; DPO: reference, then policy)
                      threads_share=share(1.0 / world) if rl or algorithm.role_specs else None,
                      data_ranks=data_ranks)]
    if rl:
        place = layout.placements["rollout"]
        tp = args.vllm_tensor_parallel_size if args.use_vllm else 1
        rollout = RolloutConfig(
            model_dir=absolute(args.model), engine="vllm" if args.use_vllm else "hf", torch_dtype=rollout_dtype,
            quantization=rollout_quantization,
            return_logprobs=algorithm.uses_rollout_logprobs or rollout_dtype != dtype or rollout_quantization is not None,
            attn_impl=args.attn_impl, seed=args.seed,
            vllm_gpu_memory_utilization=args.vllm_gpu_memory_utilization, vllm_max_model_len=args.vllm_max_model_len,
            vllm_tensor_parallel_size=args.vllm_tensor_parallel_size, vllm_enable_prefix_caching=args.vllm_enable_prefix_caching,
            sleep_level=args.sleep_level,
            bundle_indices=tuple(range(tp)) if (tp > 1 and "rollout" in layout.colocated) else ())
        roles.append(RolePlan("rollout", "swiftray.actors.rollout:RolloutActor", rollout, place,
                              threads_share=share(1.0 / place.num_workers)))
    for spec in algorithm.role_specs:
        # A trained role may take the policy's training settings (a critic): its config is then a function of them.
        config = spec.config(roles[0].config) if callable(spec.config) else spec.config
        roles.append(RolePlan(spec.name, spec.actor, _with_dtype(config, dtype), layout.placements[spec.name],
                              phases=spec.phases, threads_share=share(1.0) if spec.wants_gpu else None))

    notes = compat_notes(args, command, rollouts=rl)
    if not on_gpu:
        gpu_only = [f for f in ("offload_model", "offload_optimizer", "gc_collect_after_offload")
                    if getattr(args, f, False)]
        if getattr(args, "sleep_level", 0):
            gpu_only.append(f"sleep_level={args.sleep_level}")
        if gpu_only:
            notes.append(f"no GPU: {', '.join(gpu_only)} free GPU memory; on CPU the same calls run and free nothing")
        half = {flag: value for flag, value in (("--torch_dtype", dtype),
                                                 ("--rollout_dtype", getattr(args, "rollout_dtype", None)))
                if value in ("bfloat16", "float16") and not cpu_has_fast_matmul(value)}
        if half:
            notes.append(f"{', '.join(f'{f} {v}' for f, v in half.items())}: this CPU has no {'/'.join(set(half.values()))} "
                         "matmul units (oneDNN finds no AVX-512 BF16/FP16 or AMX), so those matmuls fall back to a "
                         "slow reference kernel, tens of times slower than float32; float32 is faster here")
    if rl and not args.use_vllm:
        unused = [f"--{name}" for name in ("vllm_gpu_memory_utilization", "vllm_max_model_len",
                                            "vllm_tensor_parallel_size", "vllm_enable_prefix_caching")
                  if getattr(args, name) != _field_default(args, name)]
        if unused:
            notes.append(f"{', '.join(unused)}: no effect without --use_vllm true (the hf engine generates)")
    return RunPlan(
        command=command, algorithm=algorithm, model=absolute(args.model), dtype=dtype, cluster=cluster,
        ray_address=args.ray_address or os.environ.get("RAY_ADDRESS"),
        ray_bind_all_interfaces=args.ray_bind_all_interfaces,
        dist_backend=args.ddp_backend or ("nccl" if on_gpu else "gloo"),
        data=data_plan(args), template=_rl_template(template_plan(args)) if rl else template_plan(args),
        batch=batch, schedule=schedule,
        output=OutputPlan(args.output_dir, args.add_version, tuple(args.report_to),
                          getattr(args, "log_completions", False)),
        step=_step_plan(args, colocated, algorithm) if rl else StepPlan(mode="sft"),
        roles=tuple(roles), groups=layout.groups, notes=tuple(notes),
        cluster_plan=_cluster_plan(args) if rl else ClusterPlan())


def _cluster_plan(args: Any) -> ClusterPlan:
    engines = args.num_infer_workers or 1
    return ClusterPlan(weight_sync=args.weight_sync, max_restarts=args.max_restarts,
                       memory_checkpoint_steps=args.memory_checkpoint_steps, min_engines=args.min_infer_workers,
                       max_engines=args.max_infer_workers or engines)


# ---------------------------------------------------------------------------------------- printing


def describe(plan: RunPlan) -> str:
    """What --print_plan prints: the cluster, every role's placement, dtype, batch sizes and step counts."""
    b, s = plan.batch, plan.schedule
    lines = [f"swiftray {plan.command}: {plan.algorithm.name} on {plan.cluster.describe()}",
             f"  model {plan.model} in {plan.dtype}; policy process group: {plan.dist_backend}"]
    if plan.step.mode != "sft":
        lines.append(f"  step: {plan.step.mode}" + (
            f" (sleep_level {plan.step.sleep_level}, offload_model {plan.step.offload_model}, "
            f"offload_optimizer {plan.step.offload_optimizer})" if plan.step.mode == "colocated" else ""))
    lines.append("  roles:")
    for role in plan.roles:
        p = role.placement
        gpu = f"{p.num_gpus:g} GPU" if p.num_gpus else "no GPU"
        shared = f", in the {p.group} group's bundles {list(p.bundles)}" if p.group != role.name else ""
        engine = getattr(role.config, "backend", None) or getattr(role.config, "engine", None)
        if getattr(role.config, "quantization", None):
            engine += f" ({role.config.quantization} weights)"
        lines.append(f"    {role.name:<10} {p.num_workers} worker(s) x {p.num_cpus:g} CPU, {gpu}{shared}"
                     + (f"; {engine}" if engine else "") + (f"; phases {', '.join(role.phases)}" if role.phases else ""))
        lines.append(f"               on {', '.join(_runs(p.devices))}")
        if hasattr(role.config, "describe"):  # a model-parallel trainer: its layout and each rank's data shard
            lines.append(f"               {role.config.describe(p.num_workers)}"
                         + (f"; data shard of each rank {list(role.data_ranks)}" if role.data_ranks else ""))
    lines.append(f"  batch: {b.micro_batch_size} per rank x {b.world_size} rank(s) x {b.accumulation} accumulation "
                 f"= {b.samples_per_optimizer_step} {'completions' if b.num_generations else 'samples'} "
                 "per optimizer step")
    if b.num_generations:
        lines.append(f"  generation: {b.prompts_per_generation} prompts x {b.num_generations} = "
                     f"{b.completions_per_generation} completions per step, {b.optimizer_steps_per_generation} "
                     f"optimizer step(s) x {plan.algorithm.num_iterations} iteration(s); "
                     f"{b.rollout_batch_size} prompts per rollout call")
    if s is not None:
        lines.append(f"  schedule: {s.total_steps} steps ({s.steps_per_epoch} per epoch); log every "
                     f"{s.logging_steps}, eval {_when(s.eval_strategy, s.eval_steps)}, save "
                     f"{_when(s.save_strategy, s.save_steps)}; best by {s.metric_for_best_model}"
                     + (f"; resume from {s.resume_from_checkpoint}" if s.resume_from_checkpoint else ""))
    c = plan.cluster_plan
    if plan.step.mode != "sft":
        lines.append(f"  weight sync: {c.weight_sync} (engines on policy rank 0's node: "
                     f"{c.transport(True, getattr(plan.role('rollout').config, 'engine', 'hf'))}; elsewhere: "
                     f"{c.transport(False)}); rollout pool {c.min_engines}..{c.max_engines} engines; "
                     f"--max_restarts {c.max_restarts}, memory checkpoint "
                     + (f"every {c.memory_checkpoint_steps} steps" if c.memory_checkpoint_steps else "off"))
    lines.append(f"  output: {plan.output.output_dir}" + ("/vN-<time>" if plan.output.add_version else "")
                 + (f", reporting to {', '.join(plan.output.report_to)}" if plan.output.report_to else ""))
    lines += [f"  note: {note}" for note in plan.notes]
    return "\n".join(lines)


def _when(strategy: str, every: int) -> str:
    return {"no": "never", "epoch": "every epoch"}.get(strategy, f"every {every} steps")


def _runs(devices: tuple[str, ...]) -> list[str]:
    """"cpu" x 3 -> ["3 x cpu"]; distinct devices listed as they are."""
    if len(set(devices)) == 1 and len(devices) > 1:
        return [f"{len(devices)} x {devices[0]}"]
    return list(devices)
