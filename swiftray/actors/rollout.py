"""RolloutActor: generates completions with an engine (hf or vllm) and takes weight updates.

    generate(prompts, params)          -> RolloutBatch (stays in the object store)
    update_weights(version, buckets)   policy weights arrive as ObjectRefs of tensor buckets (or a shared buffer)
    receive_weights()                  ... or by broadcast from policy rank 0 (collective_sync.py)
    sleep(level) / wake_up(tags)       free memory while the policy trains (colocated mode)
"""

from __future__ import annotations

import logging
import time
from typing import Any

import ray
import torch

from swiftray.actors import shared_weights
from swiftray.actors.configs import RolloutConfig, as_config
from swiftray.actors.group import DistributedWorker
from swiftray.experience import RolloutBatch
from swiftray.models.generation import Completion, HFEngine, SamplingParams

logger = logging.getLogger("swiftray")


class RolloutActor(DistributedWorker):
    def setup(self, config: RolloutConfig | dict[str, Any]) -> None:
        """Start the engine of `config` (a RolloutConfig; a dict of its fields works too)."""
        cfg = as_config(RolloutConfig, config)
        self.version = 0
        self.engine_name = cfg.engine
        self.return_logprobs = cfg.return_logprobs
        torch.manual_seed(cfg.seed + 1000 * self.rank)
        if cfg.engine == "vllm":
            from swiftray.actors.vllm_engine import VLLMEngine

            self.engine = VLLMEngine(cfg)
            self.tokenizer = self.engine.tokenizer
        else:
            from swiftray.models.inference import load_inference_model

            model, self.tokenizer = load_inference_model(cfg.model_dir, torch_dtype=cfg.torch_dtype,
                                                         attn_impl=cfg.attn_impl)
            self.engine = HFEngine(model, self.tokenizer, batch_size=cfg.batch_size, quantization=cfg.quantization)

    def generate(self, prompts: list[dict[str, Any]], params: SamplingParams, seed: int | None = None) -> RolloutBatch:
        """`params.n` completions per prompt row; a row holds `prompt_ids` and its dataset columns.
        `seed` fixes the sampling: the driver gives each chunk of prompts its own, whichever engine runs it."""
        if seed is not None or self.return_logprobs:
            params = SamplingParams(**{**params.__dict__, "seed": params.seed if seed is None else seed,
                                       "logprobs": self.return_logprobs})
        start = time.time()
        if params.from_dataset:
            outputs = dataset_responses(prompts, params.max_new_tokens)
        else:
            outputs = self.engine.generate([row["prompt_ids"] for row in prompts], params)
        columns = {k: [] for k in prompts[0] if k != "prompt_ids"} if prompts else {}
        batch = RolloutBatch([], [], [], [], [], columns, self.version)
        for out in outputs:
            row = prompts[out.prompt_index]
            batch.prompt_ids.append(row["prompt_ids"])
            batch.completion_ids.append(out.token_ids)
            batch.completions.append(self.tokenizer.decode(out.token_ids, skip_special_tokens=True))
            batch.truncated.append(out.finish_reason == "length")
            batch.group.append(out.prompt_index)
            for k in columns:
                columns[k].append(row[k])
        if params.from_dataset:  # what an algorithm needs to tell these steps apart (GKD's SFT term)
            batch.annotations["from_dataset"] = [True] * len(batch)
        elif self.return_logprobs and len(batch):
            # The engine's own log-probs of what it sampled (the hf engine's decoder keeps them); otherwise
            # scored again by the engine's model (its dtype, its kernels), up to the difference between a
            # decode step and a full forward.
            kept = [out.logprobs for out in outputs]
            batch.annotations["rollout_logprobs"] = (
                kept if all(lp is not None for lp in kept)
                else self.engine.completion_logprobs(batch.prompt_ids, batch.completion_ids))
        batch.timings["generate_s"] = time.time() - start
        return batch

    def update_weights(self, version: int, bucket_refs: list[ray.ObjectRef] | list[dict]) -> int:
        """Load the policy's weights, bucket by bucket as they arrive (or from its shared-memory
        buffer, given its handle: the hf engine's parameters then alias the buffer); returns the
        tensors loaded."""
        loaded = 0
        for ref in bucket_refs:
            shared = shared_weights.is_handle(ref)
            if shared:  # the policy's shared-memory buffer (same node)
                if getattr(self, "_shared_reader", None) is None:
                    self._shared_reader = shared_weights.SharedWeightsReader()
                bucket = self._shared_reader.read(ref)
            else:
                bucket = ray.get(ref) if isinstance(ref, ray.ObjectRef) else ref
            if shared and isinstance(self.engine, HFEngine):
                # One copy in all: the model's parameters become views of the buffer. Safe because the
                # policy writes this buffer again only two syncs later, and the driver starts that
                # export only after every rollout has loaded the next one (shared_weights.py).
                self.engine.load_weights(bucket, share=True)
            else:  # object-store tensors are views of Ray's store, which frees them; vLLM copies anyway
                self.engine.load_weights(bucket)
            loaded += len(bucket)
        self.version = version
        return loaded

    def join_weight_group(self, master_addr: str, master_port: int, rank: int, size: int, backend: str,
                          epoch: int) -> None:
        """Join the weight-broadcast group that policy rank 0 leads (collective_sync.py)."""
        from swiftray.actors.collective_sync import WeightBroadcast

        self._weight_group = None
        self._weight_group = WeightBroadcast(master_addr, master_port, rank, size, backend, epoch)

    def receive_weights(self) -> int:
        """Load one broadcast of the policy's weights (its version comes with it); returns the tensors loaded."""
        version, state = self._weight_group.receive()
        self.engine.load_weights(state)  # copied: the buckets are freed after this call
        self.version = version
        return len(state)

    def sequence_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """The engine's log-probs of given completions (to check a weight sync against the policy)."""
        return self.engine.completion_logprobs(prompt_ids, completion_ids)

    def get_version(self) -> int:
        return self.version

    def sleep(self, level: int = 1) -> None:
        """Colocated mode, while the policy trains: free the KV cache (1), and the weights too (2)."""
        self.engine.sleep(level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take memory back: "weights" (before a weight sync), then "kv_cache" (before generating); all if None."""
        self.engine.wake_up(tags)


def dataset_responses(prompts: list[dict[str, Any]], max_new_tokens: int) -> list[Completion]:
    """Each row's dataset response as a completion, cut to max_new_tokens ("length", as a sample would be)."""
    out = []
    for i, row in enumerate(prompts):
        response = row.get("response_ids")
        if not response:
            messages = row.get("messages") or [{"content": ""}]
            raise ValueError(f"prompt {messages[-1].get('content', '')!r:.80}: no dataset response to train on "
                             "(its conversation must end with an assistant turn)")
        cut = len(response) > max_new_tokens
        out.append(Completion(i, list(response[:max_new_tokens]), "length" if cut else "stop"))
    return out
