"""`swiftray infer`: chat on a terminal, or generate over --val_dataset into --result_path (JSONL)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path
from typing import Any, TextIO

from tqdm.auto import tqdm
from transformers import TextStreamer

from swiftray.data.template import Template
from swiftray.models.generation import HFEngine, SamplingParams
from swiftray.models.inference import load_inference_model

logger = logging.getLogger("swiftray")

CLEAR_COMMANDS = ("clear", "/clear", "reset-system")
EXIT_COMMANDS = ("exit", "quit", "/exit", "/quit")


def sampling_params(args: Any) -> SamplingParams:
    return SamplingParams(max_new_tokens=args.max_new_tokens, temperature=args.temperature or 0.0,
                          top_k=args.top_k, top_p=args.top_p, repetition_penalty=args.repetition_penalty,
                          seed=args.seed)


class Chat:
    """A multi-turn conversation with one model."""

    def __init__(self, engine: HFEngine, template: Template, params: SamplingParams,
                 enable_thinking: bool | None = None):
        self.engine = engine
        self.template = template
        self.params = params
        self.enable_thinking = enable_thinking
        self.history: list[dict[str, str]] = []

    def reply(self, text: str, streamer: Any = None) -> str:
        self.history.append({"role": "user", "content": text})
        prompt = self.template.encode_prompt(self.history, enable_thinking=self.enable_thinking)
        completion = self.engine.generate([prompt], self.params, streamer=streamer)[0]
        answer = self.engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
        self.history.append({"role": "assistant", "content": answer})
        return answer

    def clear(self) -> None:
        self.history = []


class WriterStreamer(TextStreamer):
    """transformers' TextStreamer writing to a given stream (it always prints to sys.stdout)."""

    def __init__(self, tokenizer: Any, out: TextIO):
        super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
        self.out = out

    def on_finalized_text(self, text: str, stream_end: bool = False) -> None:
        self.out.write(text + ("\n" if stream_end else ""))
        self.out.flush()


def interactive(chat: Chat, stream: bool, stdin: TextIO | None = None, stdout: TextIO | None = None) -> None:
    """Read a turn per line until EOF or an exit command; `clear` forgets the conversation."""
    # Looked up per call, not bound at import, so that a redirected sys.stdin/stdout is honoured.
    stdin = stdin or sys.stdin
    stdout = stdout or sys.stdout
    print(f"Input `{CLEAR_COMMANDS[0]}` to clear the history, `{EXIT_COMMANDS[0]}` to leave.", file=stdout)
    while True:
        print("<<< ", end="", file=stdout, flush=True)
        line = stdin.readline()
        if not line:
            break
        text = line.strip()
        if not text:
            continue
        if text in EXIT_COMMANDS:
            break
        if text in CLEAR_COMMANDS:
            chat.clear()
            print("history cleared", file=stdout)
            continue
        if stream:
            chat.reply(text, streamer=WriterStreamer(chat.engine.tokenizer, stdout))
        else:
            print(chat.reply(text), file=stdout)
        print("-" * 40, file=stdout, flush=True)


def batch_infer(engine: HFEngine, template: Template, rows: list[dict[str, Any]], params: SamplingParams,
                result_path: Path, batch_size: int, enable_thinking: bool | None = None) -> list[dict[str, Any]]:
    """Answer every row's last user turn; write one JSON line per row (response, and labels if the row had one)."""
    result_path.parent.mkdir(parents=True, exist_ok=True)
    results = []
    with open(result_path, "w", encoding="utf-8") as out:
        for start in tqdm(range(0, len(rows), batch_size), desc="infer", unit="batch"):
            chunk = rows[start:start + batch_size]
            prompts, labels = [], []
            for row in chunk:
                messages = list(row["messages"])
                label = messages.pop()["content"] if messages and messages[-1]["role"] == "assistant" else None
                prompts.append(template.encode_prompt(messages, enable_thinking=enable_thinking))
                labels.append(label)
            for row, label, completion in zip(chunk, labels, engine.generate(prompts, params)):
                response = engine.tokenizer.decode(completion.token_ids, skip_special_tokens=True)
                record = {**{k: v for k, v in row.items() if k != "messages"},
                          "messages": row["messages"], "response": response, "labels": label}
                out.write(json.dumps(record, ensure_ascii=False) + "\n")
                results.append(record)
    return results


def make_engine(args: Any) -> Any:
    """The generation engine of --infer_backend: hf (transformers, with adapters) or vllm."""
    if args.infer_backend == "vllm":
        import importlib.util

        from swiftray.arguments import ArgumentError

        if importlib.util.find_spec("vllm") is None:
            raise ArgumentError("--infer_backend vllm: vLLM is not installed here (on GPUs: pip install "
                                "'swiftray[vllm]'; on CPU: bash scripts/setup_vllm_cpu.sh, then use .venv-vllm)")
        if args.adapters:
            raise ArgumentError("--infer_backend vllm takes a whole model: merge the adapter first "
                                "(swiftray export --adapters ... --merge_lora true) and pass --model")
        if args.stream:
            logger.warning("--stream true with --infer_backend vllm: each answer is printed when it is complete")
        from swiftray.actors.configs import RolloutConfig
        from swiftray.actors.vllm_engine import VLLMEngine

        engine = VLLMEngine(RolloutConfig(model_dir=args.model, engine="vllm", torch_dtype=args.torch_dtype or "auto",
                                          seed=args.seed))
    else:
        model, tokenizer = load_inference_model(args.model, args.adapters, torch_dtype=args.torch_dtype,
                                                attn_impl=args.attn_impl)
        engine = HFEngine(model, tokenizer, batch_size=args.max_batch_size)
    if args.template:
        from swiftray.data.chat_templates import resolve_chat_template

        engine.tokenizer.chat_template = resolve_chat_template(args.template)
    return engine


def run_infer(args: Any) -> list[dict[str, Any]] | None:
    engine = make_engine(args)
    template = Template(engine.tokenizer, default_system=args.system, max_length=args.max_length,
                        truncation_strategy="left")
    params = sampling_params(args)
    if args.val_dataset:
        from swiftray.data.loader import load_datasets

        rows = list(load_datasets(args.val_dataset, seed=args.seed, shuffle=False, allow_no_response=True,
                                  model_name=args.model_name, model_author=args.model_author))
        default = Path(args.adapters[0] if args.adapters else args.model) / "infer_result" / "result.jsonl"
        result_path = Path(args.result_path) if args.result_path else default
        results = batch_infer(engine, template, rows, params, result_path, args.max_batch_size,
                              args.enable_thinking)
        logger.info("wrote %d results to %s", len(results), result_path)
        return results
    interactive(Chat(engine, template, params, args.enable_thinking),
                stream=args.stream and args.infer_backend != "vllm")
    return None
