"""Colocation on a real GPU: sleep levels free the engine's memory, offload frees the policy's, and a
colocated GRPO step runs the whole sequence (skipped without CUDA; scripts/gpu_check.sh runs them).

On CPU the same calls run in the same order and free nothing (tests/test_rl_roles.py checks the order);
these tests check that on a GPU they free what they say.
"""

from __future__ import annotations

import importlib.util
import json

import pytest
import ray
import torch
from _ray import ray_cluster  # noqa: F401

from swiftray.actors.group import ActorGroup
from swiftray.actors.policy import PolicyActor
from swiftray.algorithms.sft import SFT
from swiftray.arguments import RlhfArguments
from swiftray.cli_parser import parse_args

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM")


def batch(n: int = 4, width: int = 24) -> dict:
    ids = torch.randint(3, 1000, (n, width))
    labels = ids.clone()
    labels[:, :width // 2] = -100
    return {"input_ids": ids, "labels": labels, "attention_mask": torch.ones_like(ids)}


def test_policy_offload_moves_weights_and_optimizer_off_the_gpu(ray_cluster, tiny_model_dir):  # noqa: F811
    group = ActorGroup(PolicyActor, 1, num_cpus_per_worker=1, num_gpus_per_worker=1, name="offload-check")
    try:
        ray.get(group.call_all("setup", {"model_dir": str(tiny_model_dir), "train_type": "full"}))
        first = ray.get(group.call_all("train_step", [batch()], SFT().loss))[0]
        before = ray.get(group.actors[0].device_memory_gb.remote())
        ray.get(group.call_all("offload", model=True, optimizer=True, gc_collect=True))
        offloaded = ray.get(group.actors[0].device_memory_gb.remote())
        ray.get(group.call_all("onload"))
        back = ray.get(group.actors[0].device_memory_gb.remote())
        second = ray.get(group.call_all("train_step", [batch()], SFT().loss))[0]
    finally:
        group.shutdown()
    assert offloaded < before and back > offloaded, (before, offloaded, back)
    assert torch.isfinite(torch.tensor([first["loss"], second["loss"]])).all()


@needs_vllm
@pytest.mark.parametrize("level", [1, 2])
def test_vllm_sleep_frees_memory_and_wakes_to_the_same_answers(tiny_model_dir, level):
    from swiftray.actors.configs import RolloutConfig
    from swiftray.actors.vllm_engine import VLLMEngine
    from swiftray.models.generation import SamplingParams

    engine = VLLMEngine(RolloutConfig(model_dir=str(tiny_model_dir), engine="vllm", torch_dtype="float32",
                                      sleep_level=level, vllm_gpu_memory_utilization=0.3, vllm_max_model_len=512))
    greedy = SamplingParams(max_new_tokens=16, temperature=0.0)
    prompts = [engine.tokenizer.encode("what is 2 + 3?")]
    before = engine.generate(prompts, greedy)[0].token_ids
    awake = torch.cuda.mem_get_info()[0]
    engine.sleep(level)
    asleep = torch.cuda.mem_get_info()[0]
    assert asleep > awake, "sleeping freed no GPU memory"
    engine.wake_up(["weights"])
    if level == 2:  # the weights were discarded: they come back by a weight sync
        from safetensors.torch import load_file

        engine.load_weights(load_file(str(tiny_model_dir / "model.safetensors")))
    engine.wake_up(["kv_cache"])
    assert engine.generate(prompts, greedy)[0].token_ids == before


@needs_vllm
def test_colocated_grpo_sleeps_and_offloads_each_step(ray_cluster, tiny_model_dir, tmp_path):  # noqa: F811
    from swiftray.controller import rl

    argv = ["--rlhf_type", "grpo", "--model", str(tiny_model_dir), "--dataset", "swiftray/arithmetic#32",
            "--train_type", "full", "--max_steps", "2", "--per_device_train_batch_size", "8",
            "--gradient_accumulation_steps", "1", "--num_generations", "4", "--max_completion_length", "16",
            "--logging_steps", "1", "--output_dir", str(tmp_path), "--report_to", "none", "--save_strategy", "no",
            "--reward_funcs", "accuracy", "--use_vllm", "true", "--vllm_gpu_memory_utilization", "0.3",
            "--sleep_level", "1", "--offload_model", "true", "--offload_optimizer", "true",
            "--gc_collect_after_offload", "true"]
    run_dir = rl.run_rlhf(parse_args(RlhfArguments, argv))
    lines = [json.loads(x) for x in (run_dir / "logging.jsonl").read_text().splitlines()]
    train = [line for line in lines if "train/loss" in line]
    assert len(train) == 2
    for line in train:  # memory in use on the shared GPU after each call of the colocated step
        assert line["train/memory/after_sleep_gb"] < line["train/memory/after_wake_kv_cache_gb"]
        assert line["train/memory/after_offload_gb"] < line["train/memory/after_onload_gb"]
