"""Turn chat messages into token ids and loss labels, using the tokenizer's own chat template.

The whole conversation is rendered once with the chat template and tokenised once,
so the ids are exactly what the model sees. Which characters get loss is decided on
the rendered text (`swiftray/data/assistant_spans.py` finds each assistant turn, by the
template's `{% generation %}` markers or by its header and end tokens, trimmed to one
convention for every family), and a token gets loss when the character it starts at
does (offset mapping).

Training samples are rendered with TRL's training variant of the template when the
tokenizer's template is a known official one (`swiftray/data/chat_templates.py`): the
same text plus markers, and for DeepSeek-R1 the reasoning that the official template
strips. Prompts for generation (`encode_prompt`) always use the tokenizer's template,
so they equal `apply_chat_template(..., add_generation_prompt=True)`.

Loss scales follow ms-swift's `--loss_scale`: a base strategy (`default`: every
assistant turn; `last_round`: only assistant turns after the last user or tool
message; `all`: every token), optionally chained with `+ignore_empty_think`
(no loss on an empty `<think>\\n\\n</think>\\n\\n` at the start of a turn, or on the
`\\n</think>\\n\\n` that closes one the generation prompt opened).
A message's own `loss: true/false` field overrides the strategy for that turn.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import jinja2
from transformers import PreTrainedTokenizerBase
from transformers.utils.chat_template_utils import render_jinja_template

from swiftray.data.assistant_spans import TurnFinder
from swiftray.data.chat_templates import family_name, training_variant

logger = logging.getLogger("swiftray")

IGNORE_INDEX = -100
BASE_STRATEGIES = ("default", "last_round", "all")
EXTRA_LOSS_SCALES = ("ignore_empty_think",)
TRUNCATION_STRATEGIES = ("delete", "left", "right")
ROLES = ("system", "user", "assistant", "tool")
# ms-swift's older spelling of last_round+ignore_empty_think.
_LOSS_SCALE_ALIASES = {"last_round_with_ignore_empty_think": "last_round+ignore_empty_think"}
# Same pattern as ms-swift's ignore_empty_think config, matched at the start of an assistant turn.
_EMPTY_THINK = re.compile(r"<think>\s*</think>\s*")
_OPENED_THINK = re.compile(r"<think>\s*\Z")  # the generation prompt opened the block (DeepSeek-R1)
_CLOSE_EMPTY_THINK = re.compile(r"\s*</think>\s*")
_MARKER = re.compile(r"<[^<>\s]{1,40}>")  # special-token-like strings: <|im_start|>, <think>
_GENERATION_TAG = re.compile(r"\{%-?\s*generation\s*-?%\}")
# What a chat template raises on a conversation it cannot render (raise_exception, missing fields).
_TEMPLATE_ERRORS = (jinja2.TemplateError, TypeError, KeyError, AttributeError, IndexError)

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
    """Encodes conversations for training (`encode`) and for generation (`encode_prompt`).

    `training_template` renders training samples instead of the default: TRL's training variant
    when the tokenizer's template is a known official one, else the tokenizer's template.
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        default_system: str | None = None,
        max_length: int | None = None,
        truncation_strategy: str = "delete",
        loss_scale: str = "default",
        training_template: str | None = None,
    ):
        if truncation_strategy not in TRUNCATION_STRATEGIES:
            raise ValueError(
                f"truncation_strategy={truncation_strategy!r}; expected one of {TRUNCATION_STRATEGIES}"
            )
        if not getattr(tokenizer, "is_fast", False):
            raise ValueError("Template needs a fast tokenizer (it uses offset mappings)")
        if not tokenizer.chat_template:
            raise ValueError(f"the tokenizer of {tokenizer.name_or_path!r} has no chat_template "
                             "(give one with --template NAME or --template FILE.jinja)")
        self.tokenizer = tokenizer
        self.default_system = default_system
        self.max_length = max_length
        self.truncation_strategy = truncation_strategy
        self.loss_scale = loss_scale
        self.base_strategy, self.ignore_empty_think = parse_loss_scale(loss_scale)

        chat_template = tokenizer.get_chat_template()
        known = training_variant(chat_template)
        self.training_template = training_template or (known[1] if known else chat_template)
        name = known[0] if known else family_name(self.training_template)
        self.describe = (f"chat template {name!r}" if name
                         else f"the chat template of {tokenizer.name_or_path!r}")
        self.marked = _GENERATION_TAG.search(self.training_template) is not None
        # Multimodal templates read contents as [{"type": "text", "text": ...}] blocks.
        self.text_blocks = self._needs_text_blocks()
        atoms = [*tokenizer.get_added_vocab(), *tokenizer.all_special_tokens]
        self.turns = TurnFinder(self._render_probe, atoms, self.describe, marked=self.marked)
        split = [m for m in _MARKER.findall(self.turns.gen_prompt) if len(tokenizer.tokenize(m)) > 1]
        if split:
            logger.warning("%s writes %s, which this tokenizer splits into several tokens: is it the "
                           "template of this model?", self.describe, ", ".join(split))

    # ----------------------------------------------------------------- public API

    def encode(self, messages: Messages, *, tools: list[dict] | None = None) -> dict[str, list[int]]:
        """Ids and labels (IGNORE_INDEX where no loss) of a whole conversation, truncated to max_length.

        Raises SampleTooLongError when the sample is too long and truncation_strategy is "delete".
        """
        messages = self._prepare(messages)
        if not any(m["role"] == "assistant" for m in messages):
            raise ValueError("the conversation has no assistant message to train on")
        if self.marked:
            text, marks = self._render_marked(messages, tools)
        else:
            text, marks = self._render_training(messages, tools=tools), None
        spans = self.turns.assistant_spans(messages, text, marks, tools)
        char_loss = self._char_loss_mask(text, messages, spans)
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
        """Ids of the conversation followed by the generation prompt; a final assistant turn is dropped.

        Rendered with the tokenizer's own chat template, as `apply_chat_template(...,
        add_generation_prompt=True)` does.
        """
        messages = self._prepare(messages)
        if messages and messages[-1]["role"] == "assistant":
            messages = messages[:-1]
        kwargs = {} if enable_thinking is None else {"enable_thinking": enable_thinking}
        text = self._render(messages, None, tools=tools, add_generation_prompt=True, **kwargs)
        return self._truncate(list(self.tokenizer(text, add_special_tokens=False)["input_ids"]))

    # ----------------------------------------------------------------- rendering

    def _render(self, messages: Messages, chat_template: str | None, **kwargs: Any) -> str:
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, chat_template=chat_template,
                                                      **kwargs)
        except _TEMPLATE_ERRORS as err:
            raise ValueError(f"{self.describe} cannot render this conversation: {_one_line(err)}") from err

    def _render_training(self, messages: Messages, **kwargs: Any) -> str:
        return self._render(messages, self.training_template, **kwargs)

    def _render_marked(self, messages: Messages, tools: list[dict] | None) -> tuple[str, list[tuple[int, int]]]:
        """The rendered text and the character span of every {% generation %} block."""
        try:
            (text,), (marks,) = render_jinja_template(
                conversations=[messages], tools=tools, chat_template=self.training_template,
                return_assistant_tokens_mask=True, **self.tokenizer.special_tokens_map)
        except _TEMPLATE_ERRORS as err:
            raise ValueError(f"{self.describe} cannot render this conversation: {_one_line(err)}") from err
        return text, marks

    def _render_probe(self, messages: Messages, **kwargs: Any) -> str:
        """Render a probe conversation (TurnFinder's) as encode would: text blocks where the template needs them."""
        return self._render_training(_as_text_blocks(messages) if self.text_blocks else messages, **kwargs)

    def _needs_text_blocks(self) -> bool:
        """True when the template drops or rejects plain-string contents but renders text blocks (VLM templates)."""
        probe = [{"role": "user", "content": "Probe question?"}, {"role": "assistant", "content": "Probe answer."}]
        for blocks in (False, True):
            try:
                text = self._render_training(_as_text_blocks(probe) if blocks else probe)
            except ValueError as err:
                failure = f"a one-turn conversation fails ({_one_line(err.__cause__ or err)})"
                continue
            if "Probe question?" in text and "Probe answer." in text:
                return blocks
            failure = f"it drops the message contents of a one-turn conversation (renders {text[:200]!r})"
        raise ValueError(f"{self.describe} cannot be used: {failure}")

    def _prepare(self, messages: Messages) -> Messages:
        """Check roles and contents; add the default system prompt when the row has none.

        Keys set to None (a column other rows of the dataset have) are dropped: templates test
        for their presence.
        """
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
        # never modify the caller's rows
        messages = [{k: v for k, v in m.items() if v is not None or k == "content"} for m in messages]
        if messages[0]["role"] != "system" and self.default_system is not None:
            messages.insert(0, {"role": "system", "content": self.default_system})
        return _as_text_blocks(messages) if self.text_blocks else messages

    # ----------------------------------------------------------------- labels

    def _char_loss_mask(self, text: str, messages: Messages, spans: list[tuple[int, int]]) -> bytearray:
        """One byte per character of `text`: 1 where the character is trained on."""
        mask = bytearray([self.base_strategy == "all"]) * len(text)
        last_query = max((i for i, m in enumerate(messages) if m["role"] in ("user", "tool")), default=-1)
        assistant_idx = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        for i, (start, end) in zip(assistant_idx, spans):
            if end <= start:
                continue
            explicit = messages[i].get("loss")
            train = (
                bool(explicit)
                if explicit is not None
                else (self.base_strategy != "last_round" or i > last_query)
            )
            mask[start:end] = bytes([train]) * (end - start)
            if self.ignore_empty_think and (empty := _empty_think_at(text, start, end)):
                mask[start:empty] = bytes(empty - start)
        return mask

    def _truncate(self, ids: list[int]) -> list[int]:
        if self.max_length is None or len(ids) <= self.max_length:
            return ids
        if self.truncation_strategy == "delete":
            raise SampleTooLongError(len(ids), self.max_length)
        return ids[-self.max_length :] if self.truncation_strategy == "left" else ids[: self.max_length]


def _empty_think_at(text: str, start: int, end: int) -> int | None:
    """End of an empty think block at `start` (or of the close of one the generation prompt opened)."""
    if m := _EMPTY_THINK.match(text, start, end):
        return m.end()
    if _OPENED_THINK.search(text, max(0, start - 16), start) and (m := _CLOSE_EMPTY_THINK.match(text, start, end)):
        return m.end()
    return None


def _as_text_blocks(messages: Messages) -> Messages:
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m.get("content"), str) else m
            for m in messages]


def _one_line(err: BaseException) -> str:
    return " ".join(str(err).split())[:300] or type(err).__name__
