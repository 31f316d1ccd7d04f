"""The run plan: GPU placement and colocation (planned on described clusters, and started on Ray with
fake GPUs in a subprocess), CPU shares, batch arithmetic, one dtype for every role, --print_plan."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
from _ray import REPO

from swiftray.algorithms import get_algorithm
from swiftray.arguments import ArgumentError, RlhfArguments, SftArguments
from swiftray.cli_parser import parse_args
from swiftray.placement import Cluster, Node
from swiftray.plan import build_plan, describe

# The reference document's GRPO command (tests/test_rl_loop.py holds it verbatim), model and data local.
GRPO_FLAGS = """--rlhf_type grpo --train_type full --torch_dtype bfloat16 --num_train_epochs 1
    --per_device_train_batch_size 2 --per_device_eval_batch_size 2 --learning_rate 1e-6 --save_total_limit 2
    --logging_steps 5 --output_dir output --gradient_accumulation_steps 1 --warmup_ratio 0.05
    --dataloader_num_workers 4 --max_completion_length 4096 --vllm_max_model_len 8192 --reward_funcs accuracy
    --num_generations 16 --use_vllm true --vllm_gpu_memory_utilization 0.4 --sleep_level 1 --offload_model true
    --offload_optimizer true --gc_collect_after_offload true --deepspeed zero3 --num_infer_workers 8
    --tensor_parallel_size 1 --temperature 1.0 --top_p 0.85 --log_completions true --overlong_filter true""".split()


def gpu_cluster(nodes: int = 1, gpus: int = 8, cpus: float = 64) -> Cluster:
    return Cluster(tuple(Node(cpus, gpus) for _ in range(nodes)), "described in the test")


def rlhf_plan(model, cluster: Cluster, *flags: str, nproc: int = 8, units: int = 5000):
    env = {"NPROC_PER_NODE": str(nproc), "NNODES": "1"}
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.delenv("CUDA_VISIBLE_DEVICES", raising=False)
        args = parse_args(RlhfArguments, ["--model", str(model), "--dataset", "d.jsonl", *flags])
    return build_plan(args, get_algorithm(args.rlhf_type).from_args(args), cluster, units, "rlhf")


def test_reference_grpo_command_colocates_one_engine_per_gpu_beside_its_rank(tiny_model_dir):
    plan = rlhf_plan(tiny_model_dir, gpu_cluster(), *GRPO_FLAGS)
    policy, rollout, reference = plan.role("policy"), plan.role("rollout"), plan.role("reference")
    assert policy.placement.num_workers == 8 and rollout.placement.num_workers == 8
    assert policy.placement.devices == tuple(f"node0:gpu{i}" for i in range(8))
    # Engine i and reference worker i sit in rank i's bundle: the same GPU, a third of it each.
    assert rollout.placement.group == reference.placement.group == "policy"
    assert rollout.placement.bundles == reference.placement.bundles == tuple(range(8))
    assert rollout.placement.devices == reference.placement.devices == policy.placement.devices
    assert policy.placement.num_gpus == rollout.placement.num_gpus == reference.placement.num_gpus == 0.33
    assert reference.placement.num_workers == 8  # the reference runs on GPU, one per policy GPU
    assert plan.groups["policy"] == tuple({"CPU": 1.25, "GPU": 1.0} for _ in range(8))
    assert plan.role("reward").placement.num_gpus == 0 and plan.groups["reward"] == ({"CPU": 0.25},)
    assert plan.step.mode == "colocated" and plan.step.sleep_level == 1
    assert plan.step.offload_model and plan.step.offload_optimizer and plan.step.gc_collect_after_offload
    # One dtype for every role; the engine is vLLM with the flags' settings.
    assert plan.dtype == "bfloat16"
    assert {policy.config.torch_dtype, rollout.config.torch_dtype, reference.config.torch_dtype} == {"bfloat16"}
    assert rollout.config.engine == "vllm" and rollout.config.vllm_gpu_memory_utilization == 0.4
    assert rollout.config.sleep_level == 1  # the engines are made able to sleep
    assert policy.config.backend == "deepspeed" and plan.dist_backend == "nccl"
    # 2 per rank x 8 ranks x 1 accumulation = 16 completions: one prompt of 16 per step.
    assert plan.batch.completions_per_generation == 16 and plan.batch.prompts_per_generation == 1
    assert plan.schedule.total_steps == 5000 and plan.schedule.steps_per_epoch == 5000


def test_sixteen_gpus_place_engines_apart_from_the_policy(tiny_model_dir):
    plan = rlhf_plan(tiny_model_dir, gpu_cluster(nodes=2), *GRPO_FLAGS)
    policy, rollout, reference = plan.role("policy"), plan.role("rollout"), plan.role("reference")
    assert rollout.placement.group == "rollout" and rollout.placement.num_gpus == 1.0
    assert rollout.placement.devices == tuple(f"node1:gpu{i}" for i in range(8))
    assert not set(rollout.placement.devices) & set(policy.placement.devices)
    assert reference.placement.group == "policy" and reference.placement.num_gpus == 0.5
    assert plan.step.mode == "separate"  # engines never sleep: nothing shares their GPUs


def test_tensor_parallel_engines_span_gpus(tiny_model_dir):
    flags = [f for f in GRPO_FLAGS]
    flags[flags.index("--num_infer_workers") + 1] = "4"
    flags[flags.index("--tensor_parallel_size") + 1] = "2"
    plan = rlhf_plan(tiny_model_dir, gpu_cluster(), *flags)
    rollout = plan.role("rollout")
    assert rollout.placement.bundles == (0, 2, 4, 6)
    assert rollout.placement.devices[1] == "node0:gpu2+node0:gpu3"
    assert rollout.config.vllm_tensor_parallel_size == 2 and rollout.config.bundle_indices == (0, 1)
    # With 8 more GPUs the engines get their own: 4 engines x 2 GPUs.
    apart = rlhf_plan(tiny_model_dir, gpu_cluster(nodes=2), *flags).role("rollout")
    assert apart.placement.group == "rollout" and apart.placement.num_gpus == 2.0
    assert apart.placement.devices[0] == "node1:gpu0+node1:gpu1"


def test_layouts_that_cannot_fit_are_refused_with_what_was_asked(tiny_model_dir):
    with pytest.raises(ArgumentError, match=r"8 policy ranks .* need 8 GPUs; the cluster has 4"):
        rlhf_plan(tiny_model_dir, gpu_cluster(gpus=4), *GRPO_FLAGS)
    flags = list(GRPO_FLAGS)
    flags[flags.index("--tensor_parallel_size") + 1] = "2"
    with pytest.raises(ArgumentError, match=r"rollout: 8 worker\(s\) x 2 GPU\(s\) do not fit"):
        rlhf_plan(tiny_model_dir, gpu_cluster(), *flags)
    with pytest.raises(ArgumentError, match="--async_generate needs rollout engines on GPUs of their own"):
        rlhf_plan(tiny_model_dir, gpu_cluster(), *GRPO_FLAGS, "--async_generate", "true")
    with pytest.raises(ArgumentError, match=r"ask for .* logical CPUs .* the cluster has 4"):
        rlhf_plan(tiny_model_dir, Cluster((Node(4, 0),), "test"), "--num_cpus_per_worker", "2", nproc=2)


def test_cpu_plan_fits_every_role_on_a_small_machine(tiny_model_dir):
    plan = rlhf_plan(tiny_model_dir, Cluster((Node(4, 0),), "test"), "--num_infer_workers", "2", "--reward_funcs",
                     "accuracy", nproc=2)
    asked = sum(sum(b["CPU"] for b in bundles) for bundles in plan.groups.values())
    assert asked <= 4 and all(r.placement.num_gpus == 0 for r in plan.roles)
    assert plan.dtype == "float32" and plan.dist_backend == "gloo"
    assert plan.step.mode == "colocated"  # on CPU the roles take turns with the cores
    assert {r.name: r.threads_share for r in plan.roles} == {"policy": 0.5, "rollout": 0.5, "reward": None,
                                                              "reference": 1.0}
    asynchronous = rlhf_plan(tiny_model_dir, Cluster((Node(4, 0),), "test"), "--async_generate", "true", nproc=2)
    assert asynchronous.step.mode == "async" and asynchronous.role("policy").threads_share == 0.25


def test_ppo_roles_fit_a_two_core_machine(tiny_model_dir):
    # PPO adds a critic beside the policy: the policy's share must leave the other roles their CPUs.
    plan = rlhf_plan(tiny_model_dir, Cluster((Node(2, 0),), "test"), "--rlhf_type", "ppo", "--reward_funcs",
                     "accuracy", nproc=1)
    asked = sum(sum(b["CPU"] for b in bundles) for bundles in plan.groups.values())
    assert plan.role("critic") is not None and asked <= 2


def test_steps_per_generation_splits_a_generation_into_optimizer_steps(tiny_model_dir):
    cpu = Cluster((Node(4, 0),), "test")
    plan = rlhf_plan(tiny_model_dir, cpu, "--per_device_train_batch_size", "4", "--num_generations", "4",
                     "--gradient_accumulation_steps", "2", "--steps_per_generation", "6", nproc=1, units=30)
    b = plan.batch
    assert (b.optimizer_steps_per_generation, b.completions_per_generation, b.prompts_per_generation) == (3, 24, 6)
    assert plan.schedule.steps_per_epoch == 5  # ceil(30 prompts / 6 per generation)
    # 3 epochs (the default) of 5 generations; the LR schedule counts optimizer steps: 3 per generation.
    assert plan.schedule.total_steps == 15 and plan.role("policy").config.total_steps == 45
    same = rlhf_plan(tiny_model_dir, cpu, "--per_device_train_batch_size", "4", "--num_generations", "4",
                     "--gradient_accumulation_steps", "2", "--generation_batch_size", "24", nproc=1, units=30)
    assert same.batch == plan.batch
    with pytest.raises(ArgumentError, match="--steps_per_generation 3: must give a multiple of "
                                            "--gradient_accumulation_steps 2"):
        rlhf_plan(tiny_model_dir, cpu, "--gradient_accumulation_steps", "2", "--steps_per_generation", "3", nproc=1)
    # derived from --generation_batch_size: the error names the flag the user passed, not the derived one
    with pytest.raises(ArgumentError, match=r"^--generation_batch_size 12 \(= 3 micro-batch rounds .*, 4\): must "
                                            "give a multiple of --gradient_accumulation_steps 2"):
        rlhf_plan(tiny_model_dir, cpu, "--per_device_train_batch_size", "4", "--num_generations", "4",
                  "--gradient_accumulation_steps", "2", "--generation_batch_size", "12", nproc=1)


def test_sft_plan_counts_steps_up_and_checks_values_first(tiny_model_dir):
    args = parse_args(SftArguments, ["--model", str(tiny_model_dir), "--dataset", "d", "--num_train_epochs", "2",
                                     "--gradient_accumulation_steps", "4"])
    plan = build_plan(args, get_algorithm("sft")(), Cluster((Node(4, 0),), "test"), train_units=10)
    assert plan.schedule.steps_per_epoch == 3 and plan.schedule.total_steps == 6  # ceil(10 / 4) per epoch
    assert plan.roles[0].placement.num_cpus == max(0.5, round((os.cpu_count() or 1) / 1, 2))
    args.learning_rate = -1.0  # what a Python caller could set after parsing: still refused, by name
    with pytest.raises(ArgumentError, match=r"--learning_rate -1.0: expected a number > 0"):
        build_plan(args, get_algorithm("sft")(), Cluster((Node(4, 0),), "test"), train_units=10)


def test_describe_names_every_role_and_its_devices(tiny_model_dir):
    text = describe(rlhf_plan(tiny_model_dir, gpu_cluster(), *GRPO_FLAGS))
    assert "step: colocated (sleep_level 1, offload_model True, offload_optimizer True)" in text
    for line in ("policy     8 worker(s) x 0.5 CPU, 0.33 GPU", "rollout    8 worker(s) x 0.5 CPU, 0.33 GPU",
                 "reference  8 worker(s) x 0.25 CPU, 0.33 GPU", "reward     1 worker(s) x 0.25 CPU, no GPU"):
        assert line in text, text
    assert "on node0:gpu0, node0:gpu1" in text and "; vllm" in text and "; deepspeed" in text
    assert "generation: 1 prompts x 16 = 16 completions per step" in text
    assert "schedule: 5000 steps (5000 per epoch)" in text


def test_print_plan_starts_nothing_and_writes_nothing(tiny_model_dir, tmp_path):
    data = tmp_path / "numina.jsonl"
    data.write_text("".join(json.dumps({"problem": f"{i}+1?", "solution": str(i + 1)}) + "\n" for i in range(40)))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ",".join(map(str, range(8))), "NPROC_PER_NODE": "8",
           "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    argv = [sys.executable, "-m", "swiftray", "rlhf", "--model", str(tiny_model_dir), "--dataset", str(data),
            *GRPO_FLAGS, "--print_plan", "true"]
    argv[argv.index("--output_dir") + 1] = str(tmp_path / "out")
    done = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "launch environment: NNODES=1, CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7" in done.stdout
    assert "rollout    8 worker(s)" in done.stdout and "schedule: 40 steps (40 per epoch)" in done.stdout
    assert not (tmp_path / "out").exists()
    assert "Started a local Ray instance" not in done.stderr


FAKE_GPU_SCRIPT = textwrap.dedent('''
    import json, sys
    import ray
    from ray.cluster_utils import Cluster as RayCluster
    from swiftray.actors.group import DistributedWorker
    from swiftray.algorithms import get_algorithm
    from swiftray.arguments import RlhfArguments
    from swiftray.cli_parser import parse_args
    from swiftray.controller.roles import RunningRoles
    from swiftray.placement import cluster_from_ray
    from swiftray.plan import build_plan
    import dataclasses

    class Probe(DistributedWorker):
        """Stands in for every role's actor: where did Ray put it? (No CUDA is touched.)"""
        def where(self):
            return {"node": ray.get_runtime_context().get_node_id(), "gpus": [str(g) for g in ray.get_gpu_ids()]}

    model, nodes, flags = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
    cluster = RayCluster(initialize_head=True, head_node_args={"num_cpus": 16, "num_gpus": 4})
    for _ in range(nodes - 1):
        cluster.add_node(num_cpus=16, num_gpus=4)
    ray.init(address=cluster.address)
    args = parse_args(RlhfArguments, ["--model", model, "--dataset", "d", *flags])
    plan = build_plan(args, get_algorithm("grpo").from_args(args), cluster_from_ray(), 100, "rlhf")
    plan = dataclasses.replace(plan, roles=tuple(dataclasses.replace(r, actor="__main__:Probe") for r in plan.roles))
    roles = RunningRoles(plan, collectives=False)
    out = {name: ray.get([a.where.remote() for a in group.actors]) for name, group in roles.groups.items()}
    roles.shutdown()
    print("RESULT " + json.dumps(out))
''')


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_roles_start_where_the_plan_says_on_fake_gpus(tiny_model_dir, tmp_path, nodes):
    """Ray with fake GPUs, in a process of its own (the test session's Ray has none): colocated engines
    and reference workers get their rank's GPU; with twice the GPUs the engines get GPUs of their own.
    The reference command cut to 4 GPUs per node (every actor is a process on a 2-core machine)."""
    script = tmp_path / "fake_gpus.py"
    script.write_text(FAKE_GPU_SCRIPT)
    flags = list(GRPO_FLAGS)
    flags[flags.index("--num_infer_workers") + 1] = "4"
    flags[flags.index("--num_generations") + 1] = "8"
    env = {**os.environ, "NPROC_PER_NODE": "4", "PYTHONPATH": str(REPO), "RAY_ADDRESS": ""}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    done = subprocess.run([sys.executable, str(script), str(tiny_model_dir), str(nodes), json.dumps(flags)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    where = json.loads(done.stdout.split("RESULT ", 1)[1])
    policy = [(w["node"], tuple(w["gpus"])) for w in where["policy"]]
    assert all(len(g) == 1 for _, g in policy) and len(set(policy)) == 4
    reference = [(w["node"], tuple(w["gpus"])) for w in where["reference"]]
    assert reference == policy  # reference worker i shares rank i's GPU
    rollout = [(w["node"], tuple(w["gpus"])) for w in where["rollout"]]
    if nodes == 1:
        assert rollout == policy
    else:
        assert not set(rollout) & set(policy) and len(set(rollout)) == 4
    assert where["reward"][0]["gpus"] == []


@pytest.mark.parametrize("fast", [True, False])
def test_half_precision_on_a_cpu_without_its_matmul_units_is_named_in_the_plan(tiny_model_dir, monkeypatch, fast):
    # Without AVX-512 BF16 / AMX, torch multiplies bf16 matrices in a reference loop (60x slower here).
    monkeypatch.setattr("swiftray.plan.cpu_has_fast_matmul", lambda dtype: fast)
    cpu = Cluster((Node(4, 0),), "test")
    plan = rlhf_plan(tiny_model_dir, cpu, "--rollout_dtype", "bfloat16", nproc=2)
    noted = [n for n in plan.notes if "matmul units" in n]
    assert noted == ([] if fast else [noted[0]])
    if not fast:
        assert noted[0].startswith("--rollout_dtype bfloat16: this CPU has no bfloat16 matmul units")
    fp32 = rlhf_plan(tiny_model_dir, cpu, nproc=2)
    assert not [n for n in fp32.notes if "matmul units" in n]
    sft = build_plan(parse_args(SftArguments, ["--model", str(tiny_model_dir), "--dataset", "d", "--torch_dtype",
                                               "bf16"]), get_algorithm("sft")(), cpu, train_units=10)
    assert bool([n for n in sft.notes if n.startswith("--torch_dtype bfloat16: this CPU")]) is not fast


def test_the_fast_matmul_check_agrees_with_torch():
    import torch

    from swiftray.plan import cpu_has_fast_matmul

    assert cpu_has_fast_matmul("float32")
    assert cpu_has_fast_matmul("bfloat16") == torch.ops.mkldnn._is_mkldnn_bf16_supported()
