"""The `hf` generation engine: batched generation with the transformers model behind a small interface.

`swiftray infer` and the rollout actor both use it; the vLLM engine offers the
same `generate(prompts, params)`. Qwen3/Qwen2/Llama-shaped models sample with
`static_decode.StaticCacheDecoder` (prompts prefilled once per group, static KV cache;
about 2x `model.generate` on CPU); other models, streaming, repetition penalty, or
SWIFTRAY_STATIC_DECODE=0 use `model.generate`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import torch

from swiftray.models import static_decode


@dataclass
class SamplingParams:
    max_new_tokens: int = 512
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    repetition_penalty: float | None = None
    n: int = 1  # completions per prompt
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    # Rollouts only: instead of sampling, each prompt row's dataset response (its `response_ids`), cut to
    # max_new_tokens (GKD's off-policy steps).
    from_dataset: bool = False
    # Also return each sampled token's log-prob under the engine's logits (rollout correction); engines that
    # cannot leave Completion.logprobs None, and the rollout scores the completions again.
    logprobs: bool = False


@dataclass
class Completion:
    prompt_index: int
    token_ids: list[int]  # without padding; ends with the stop token when finish_reason == "stop"
    finish_reason: str  # "stop" | "length"
    logprobs: list[float] | None = None  # with SamplingParams.logprobs, where the engine has them


class HFEngine:
    def __init__(self, model: Any, tokenizer: Any, batch_size: int = 64, quantization: str | None = None):
        if quantization is not None:  # int8 weights for every linear (CPU): int8_linear.py
            from swiftray.models.int8_linear import quantize_linears

            quantize_linears(model, quantization)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        use_static = os.environ.get("SWIFTRAY_STATIC_DECODE", "1") != "0" and static_decode.supports(model)
        self.static = static_decode.StaticCacheDecoder(model) if use_static else None
        self.aliased: set[int] = set()  # ids of parameters that are views of a shared weight buffer

    def stop_ids(self, params: SamplingParams) -> list[int]:
        ids = list(params.stop_token_ids)
        eos = self.model.generation_config.eos_token_id
        for e in (eos if isinstance(eos, list) else [eos]) + [self.tokenizer.eos_token_id]:
            if e is not None and e not in ids:
                ids.append(e)
        return ids

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams, streamer: Any = None) -> list[Completion]:
        """`params.n` completions for each prompt, in prompt order (prompt 0's n first)."""
        if params.seed is not None:
            torch.manual_seed(params.seed)
        stop = self.stop_ids(params)
        if self.static is not None and streamer is None and params.repetition_penalty in (None, 1.0):
            return self._generate_static(prompts, params, stop)
        expanded = [(i, p) for i, p in enumerate(prompts) for _ in range(params.n)]
        out: list[Completion] = []
        for start in range(0, len(expanded), self.batch_size):
            chunk = expanded[start:start + self.batch_size]
            out.extend(self._generate_batch(chunk, params, stop, streamer))
        return out

    def _generate_static(self, prompts: list[list[int]], params: SamplingParams, stop: list[int]) -> list[Completion]:
        per_call = max(1, self.batch_size // max(1, params.n))  # batch_size counts completions
        out: list[Completion] = []
        for start in range(0, len(prompts), per_call):
            results = self.static.generate(prompts[start:start + per_call], params.n, params.max_new_tokens, stop,
                                           self.pad_id, params.temperature, params.top_k, params.top_p,
                                           logprobs=params.logprobs)
            out += [Completion(start + j // params.n, tokens, finish, logprobs)
                    for j, (tokens, finish, logprobs) in enumerate(results)]
        return out

    def _generate_batch(self, chunk: list[tuple[int, list[int]]], params: SamplingParams,
                        stop: list[int], streamer: Any) -> list[Completion]:
        width = max(len(p) for _, p in chunk)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
        attention = torch.zeros((len(chunk), width), dtype=torch.long)
        for row, (_, prompt) in enumerate(chunk):  # left padding: generation continues at the right edge
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention[row, width - len(prompt):] = 1
        sample = params.temperature is not None and params.temperature > 0
        kwargs: dict[str, Any] = dict(max_new_tokens=params.max_new_tokens, do_sample=sample,
                                      eos_token_id=stop, pad_token_id=self.pad_id)
        if sample:
            kwargs.update(temperature=params.temperature, top_k=params.top_k or 0, top_p=params.top_p or 1.0)
        else:  # silence transformers' warnings about sampling flags on greedy decoding
            kwargs.update(temperature=None, top_k=None, top_p=None)
        if params.repetition_penalty and params.repetition_penalty != 1.0:
            kwargs["repetition_penalty"] = params.repetition_penalty
        generated = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                        streamer=streamer, **kwargs)
        completions = []
        for row, (index, _) in enumerate(chunk):
            tokens = generated[row, width:].tolist()
            finish = "length"
            for pos, tok in enumerate(tokens):
                if tok in stop:
                    tokens, finish = tokens[:pos + 1], "stop"
                    break
            completions.append(Completion(index, tokens, finish))
        return completions

    # -- the rest of the engine interface (weight sync, scoring, memory)

    @torch.no_grad()
    def load_weights(self, named_tensors: dict[str, torch.Tensor], share: bool = False) -> None:
        """Load policy tensors into the model (names as in the model's state_dict).

        Copied in place by default. share=True (the tensors are views of the policy's shared-memory
        buffer, shared_weights.py): a CPU tensor of the parameter's dtype and shape becomes the
        parameter's storage, no copy; the caller guarantees nobody writes that memory while the model
        uses it. Anything else is copied, into memory of the model's own.
        """
        # state_dict(keep_vars) also names tied weights (lm_head.weight), which named_parameters hides;
        # they are the same Parameter object, so sharing or copying it twice is harmless.
        params = self.model.state_dict(keep_vars=True)
        unknown = [n for n in named_tensors if n not in params]
        if unknown:
            raise KeyError(f"weight sync: {len(unknown)} tensor(s) the rollout model lacks, e.g. {unknown[:3]}")
        aliased = self.aliased
        for name, tensor in named_tensors.items():
            param = params[name]
            if (share and tensor.device.type == "cpu" and param.device.type == "cpu"
                    and tensor.dtype == param.dtype and tensor.shape == param.shape):
                param.data = tensor
                # .data= keeps the parameter's version counter, and buffer k's views have the same
                # data_ptr at sync k + 2: bump it, so that whatever caches a weight by (data_ptr,
                # _version) (static_decode's prepacked weights) sees the change, as it sees a copy_.
                torch.autograd.graph.increment_version(param)
                aliased.add(id(param))
                continue
            if id(param) in aliased:  # never write into the policy's buffer: take memory of our own again
                param.data = torch.empty_like(param)
                aliased.discard(id(param))
            param.copy_(tensor.to(param.device, param.dtype))

    def completion_logprobs(self, prompt_ids: list[list[int]], completion_ids: list[list[int]]) -> list[list[float]]:
        from swiftray.models.logprobs import completion_logprobs

        return completion_logprobs(self.model, prompt_ids, completion_ids, self.pad_id)

    def sleep(self, level: int = 1) -> None:
        """On a GPU, move weights off the device while the policy trains; nothing to free on CPU."""
        if level >= 2 and next(self.model.parameters()).is_cuda:
            self.model.to("cpu")
            torch.cuda.empty_cache()

    def wake_up(self, tags: list[str] | None = None) -> None:
        """Weights back on the GPU (the hf engine has no separate KV cache to restore)."""
        if tags is not None and "weights" not in tags:
            return
        if torch.cuda.is_available() and not next(self.model.parameters()).is_cuda:
            self.model.to("cuda")
