"""The Megatron backend on a GPU: TransformerEngine's layer spec and bf16 (skipped without CUDA).

On CPU the backend runs megatron-core's local spec in fp32 (tests/test_megatron_actor.py); here the
same actor builds the TransformerEngine spec (fused norm + linear, grouped GEMM for experts) in
bf16 over nccl, and must still load, train, and export HF weights under the names a transformers
model has.
"""

from __future__ import annotations

import pytest
import ray
import torch
from _ray import ray_cluster  # noqa: F401

from swiftray.actors.group import ActorGroup
from swiftray.actors.megatron_policy import MegatronPolicyActor
from swiftray.algorithms.sft import SFT
from swiftray.models.tiny import make_tiny_model
from swiftray.models.token_stats import token_logprobs

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]


@pytest.fixture(scope="module")
def gpu_rank(ray_cluster):  # noqa: F811
    group = ActorGroup(MegatronPolicyActor, 1, num_cpus_per_worker=1, num_gpus_per_worker=1, name="megatron-gpu")
    yield group
    group.shutdown()


def batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 1900, (2, 24), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 18:] = 0
    return {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}


@pytest.mark.parametrize("impl", ["transformer_engine", "local"])
@pytest.mark.parametrize("moe", [False, True], ids=["dense", "moe"])
def test_bf16_on_gpu_matches_hf_trains_and_exports(gpu_rank, tmp_path, impl, moe):
    from transformers import AutoModelForCausalLM

    if impl == "transformer_engine":
        pytest.importorskip("transformer_engine", reason="the TransformerEngine spec needs transformer_engine")
    model_dir = make_tiny_model(tmp_path / "model", moe=moe)
    ray.get(gpu_rank.call_all("setup", {"model_dir": str(model_dir), "torch_dtype": "bfloat16", "transformer_impl": impl,
                                        "moe_grouped_gemm": moe and impl == "transformer_engine",
                                        "learning_rate": 1e-3, "lr_scheduler_type": "constant", "total_steps": 5}))
    b = batch()
    hf = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).cuda()
    with torch.no_grad():
        expected = token_logprobs(hf(input_ids=b["input_ids"].cuda(), attention_mask=b["attention_mask"].cuda()).logits,
                                  b["labels"].cuda())[0].cpu()
    (got,) = ray.get(gpu_rank.call_all("compute_logprobs", b))
    assert (got - expected).abs().max() < 0.1  # bf16 matmuls in two implementations
    losses = [ray.get(gpu_rank.call_all("train_step", [b], SFT().loss))[0]["loss"] for _ in range(3)]
    assert losses[-1] < losses[0]
    buckets = [ray.get(ref) for ref in ray.get(gpu_rank.call_all("export_weights"))[0]]
    exported = {k: v for bucket in buckets for k, v in bucket.items()}
    live = hf.state_dict()
    assert exported.keys() == live.keys()
    assert all(exported[k].shape == live[k].shape and exported[k].device.type == "cpu" for k in live)
