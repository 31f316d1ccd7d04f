"""Turn chat messages into token ids and loss labels, using the tokenizer's own chat template.

The whole conversation is rendered once with `apply_chat_template(tokenize=False)`
and tokenised once, so the ids are exactly what the model sees at inference.
Which characters get loss is decided on the rendered text:

- the assistant header (`<|im_start|>assistant\\n` for Qwen) is found by
  diffing a probe conversation rendered with and without the generation prompt;
- each assistant turn runs from the end of its header through the next eos
  token (`<|im_end|>`), so the model learns to stop;
- a token gets loss when the character it starts at does (offset mapping).

Loss scales follow ms-swift's `--loss_scale`: a base strategy (`default`: every
assistant turn; `last_round`: only assistant turns after the last user or tool
message; `all`: every token), optionally chained with `+ignore_empty_think`
(no loss on an empty `<think>\\n\\n</think>\\n\\n` at the start of a turn).
A message's own `loss: true/false` field overrides the strategy for that turn.
"""

from __future__ import annotations

import re
from typing import Any

from transformers import PreTrainedTokenizerBase

IGNORE_INDEX = -100
BASE_STRATEGIES = ("default", "last_round", "all")
EXTRA_LOSS_SCALES = ("ignore_empty_think",)
TRUNCATION_STRATEGIES = ("delete", "left", "right")
ROLES = ("system", "user", "assistant", "tool")
# ms-swift's older spelling of last_round+ignore_empty_think.
_LOSS_SCALE_ALIASES = {"last_round_with_ignore_empty_think": "last_round+ignore_empty_think"}
# Same pattern as ms-swift's ignore_empty_think config, matched at the start of an assistant turn.
_EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")

Messages = list[dict[str, Any]]


class SampleTooLongError(ValueError):
    """A sample is longer than max_length under truncation_strategy="delete"; the caller skips it."""

    def __init__(self, length: int, max_length: int):
        super().__init__(f"sample has {length} tokens, more than max_length={max_length}")
        self.length = length
        self.max_length = max_length


def parse_loss_scale(loss_scale: str) -> tuple[str, bool]:
    """Split an ms-swift loss_scale string into (base strategy, ignore_empty_think)."""
    parts = _LOSS_SCALE_ALIASES.get(loss_scale, loss_scale).split("+")
    base = parts[0] if parts[0] in BASE_STRATEGIES else "default"
    extras = parts[1:] if parts[0] in BASE_STRATEGIES else parts
    unknown = [p for p in extras if p not in EXTRA_LOSS_SCALES]
    if unknown:
        raise ValueError(
            f"loss_scale={loss_scale!r}: unknown part(s) {unknown}; supported: one of {list(BASE_STRATEGIES)}, "
            f"optionally followed by '+' and {list(EXTRA_LOSS_SCALES)}"
        )
    return base, "ignore_empty_think" in extras


class Template:
    """Encodes conversations for training (`encode`) and for generation (`encode_prompt`)."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        default_system: str | None = None,
        max_length: int | None = None,
        truncation_strategy: str = "delete",
        loss_scale: str = "default",
    ):
        if truncation_strategy not in TRUNCATION_STRATEGIES:
            raise ValueError(
                f"truncation_strategy={truncation_strategy!r}; expected one of {TRUNCATION_STRATEGIES}"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("Template needs a fast tokenizer (it uses offset mappings)")
        if not tokenizer.chat_template:
            raise ValueError("the tokenizer has no chat_template")
        if tokenizer.eos_token is None:
            raise ValueError("the tokenizer has no eos_token: cannot tell where an assistant turn ends")
        self.tokenizer = tokenizer
        self.default_system = default_system
        self.max_length = max_length
        self.truncation_strategy = truncation_strategy
        self.loss_scale = loss_scale
        self.base_strategy, self.ignore_empty_think = parse_loss_scale(loss_scale)
        self.assistant_header = self._find_assistant_header()

    # ----------------------------------------------------------------- public API

    def encode(self, messages: Messages, *, tools: list[dict] | None = None) -> dict[str, list[int]]:
        """Ids and labels (IGNORE_INDEX where no loss) of a whole conversation, truncated to max_length.

        Raises SampleTooLongError when the sample is too long and truncation_strategy is "delete".
        """
        messages = self._prepare(messages)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("the conversation has no assistant message to train on")
        text = self._render(messages, tools=tools)
        char_loss = self._char_loss_mask(text, messages)
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        input_ids = list(enc["input_ids"])
        labels = [
            tok if start < len(text) and char_loss[start] else IGNORE_INDEX
            for tok, (start, _end) in zip(input_ids, enc["offset_mapping"])
        ]
        input_ids, labels = self._truncate(input_ids), self._truncate(labels)
        return {"input_ids": input_ids, "labels": labels}

    def encode_prompt(
        self, messages: Messages, enable_thinking: bool | None = None, *, tools: list[dict] | None = None
    ) -> list[int]:
        """Ids of the conversation followed by the generation prompt; a final assistant turn is dropped."""
        messages = self._prepare(messages)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        text = self._render(messages, tools=tools, add_generation_prompt=True, **kwargs)
        return self._truncate(list(self.tokenizer(text, add_special_tokens=False)["input_ids"]))

    # ----------------------------------------------------------------- internals

    def _render(self, messages: Messages, **kwargs: Any) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, **kwargs)

    def _find_assistant_header(self) -> str:
        """The text that opens an assistant turn: what add_generation_prompt appends to a conversation."""
        probe = [{"role": "user", "content": "Hi"}]
        closed = self._render(probe)
        opened = self._render(probe, add_generation_prompt=True)
        if not opened.startswith(closed) or opened == closed:
            raise ValueError(
                "cannot find the assistant header: the chat template's generation prompt is not a suffix"
            )
        return opened[len(closed) :]

    def _prepare(self, messages: Messages) -> Messages:
        """Check roles and contents; add the default system prompt when the row has none."""
        if not isinstance(messages, list) or not messages:
            raise ValueError(f"messages must be a non-empty list of dicts, got {type(messages).__name__}")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or m.get("role") not in ROLES:
                raise ValueError(f"messages[{i}]: field 'role' must be one of {ROLES}, got {m!r:.200}")
            content_ok = isinstance(m.get("content"), str) or (
                m["role"] == "assistant" and m.get("tool_calls")
            )
            if not content_ok:
                raise ValueError(f"messages[{i}] ({m['role']}): field 'content' must be a string")
        messages = [dict(m) for m in messages]  # never modify the caller's rows
        if messages[0]["role"] != "system" and self.default_system is not None:
            messages.insert(0, {"role": "system", "content": self.default_system})
        return messages

    def _char_loss_mask(self, text: str, messages: Messages) -> bytearray:
        """One byte per character of `text`: 1 where the character is trained on."""
        mask = bytearray([self.base_strategy == "all"]) * len(text)
        last_query = max((i for i, m in enumerate(messages) if m["role"] in ("user", "tool")), default=-1)
        assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        starts = _find_all(text, self.assistant_header)
        if len(starts) != len(assistant_idx):
            raise ValueError(
                f"found {len(starts)} assistant headers {self.assistant_header!r} in the rendered conversation, "
                f"expected {len(assistant_idx)} (one per assistant message)"
            )
        eos = self.tokenizer.eos_token
        for i, header_at in zip(assistant_idx, starts):
            start = header_at + len(self.assistant_header)
            end = text.find(eos, start)
            if end < 0:
                raise ValueError(f"messages[{i}]: the rendered assistant turn does not end with {eos!r}")
            end += len(eos)
            explicit = messages[i].get("loss")
            train = (
                bool(explicit)
                if explicit is not None
                else (self.base_strategy != "last_round" or i > last_query)
            )
            mask[start:end] = bytes([train]) * (end - start)
            if self.ignore_empty_think and (empty := _EMPTY_THINK.match(text, start, end)):
                mask[start : empty.end()] = bytes(empty.end() - start)
        return mask

    def _truncate(self, ids: list[int]) -> list[int]:
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        if self.truncation_strategy == "delete":
            raise SampleTooLongError(len(ids), self.max_length)
        return ids[-self.max_length :] if self.truncation_strategy == "left" else ids[: self.max_length]


def _find_all(text: str, sub: str) -> list[int]:
    """Start offsets of every non-overlapping occurrence of `sub` in `text`."""
    return [m.start() for m in re.finditer(re.escape(sub), text)]
