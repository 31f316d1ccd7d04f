"""Where each assistant message's trained text lies in a rendered conversation.

The convention, the same for every template family (README, "Chat templates"): an
assistant turn is trained on exactly what the model has to generate when it is given
the conversation so far plus the generation prompt, up to and including the token that
ends its turn. So:

- the generation prompt is never trained: the role header (`<|im_start|>assistant\\n`,
  `<|start|>assistant`), a block it opens (`<think>\\n` for DeepSeek-R1 and Qwen3.5: a
  turn that starts with it is trained from after it), and prompt text a template moves
  into the assistant branch (DeepSeek's `<｜tool▁outputs▁end｜>` after tool results);
- the turn ends with its end token(s) (`<|im_end|>`, `<|eot_id|>`, `<|end|>`,
  `<|return|>`, `<|END_RESPONSE|><|END_OF_TURN_TOKEN|>`, GLM's `<|user|>`...); the
  whitespace a template writes after it (the `\\n` before the next turn) and an
  end-of-text token it appends to a finished conversation (Phi-3's `<|endoftext|>`)
  are not trained.

Two ways to find the turns:

- a template with `{% generation %}` markers (TRL's `*_training.jinja`): transformers
  reports each block's characters; adjacent blocks are merged, the merged blocks are
  matched to the assistant messages in order and trimmed to the convention;
- any other template: the assistant header (the part of the generation prompt that
  every rendered assistant turn repeats) starts a turn and the first end token after
  it ends it; when the headers do not match the messages one to one (a turn after
  tool results with no header, harmony's several channels per turn), each turn starts
  where the text diverges from the rendered prompt and ends where it diverges from the
  conversation cut after that message.

Everything is learned from probe conversations rendered at construction, so nothing
here knows any family by name.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import Any

Span = tuple[int, int]
Messages = list[dict[str, Any]]
# render(messages, add_generation_prompt=False, tools=None) -> the rendered text
Render = Callable[..., str]

_Q1, _A1 = "Probe question one?", "Probe answer one."
_Q2, _A2 = "Probe question two?", "Probe answer two."
_PROBE_TOOLS = [{"type": "function", "function": {
    "name": "probe", "description": "A probe.",
    "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]
_PROBE_CALL = {"type": "function", "function": {"name": "probe", "arguments": {"x": 1}}}


class TurnFinder:
    """Learns a chat template's generation prompt, header and end tokens; finds assistant turns."""

    def __init__(self, render: Render, atoms: Sequence[str], describe: str, *, marked: bool):
        self.render = render
        self.describe = describe
        atoms = sorted({a for a in atoms if len(a) > 1 and a.strip()}, key=len, reverse=True)
        self._atoms = atoms
        self._atom_re = re.compile("|".join(map(re.escape, atoms))) if atoms else None
        self._longest_atom = max(map(len, atoms), default=1)

        user = [{"role": "user", "content": _Q1}]
        closed, opened = render(user), render(user, add_generation_prompt=True)
        start = self._back_off(opened, _lcp(closed, opened), closed)
        self.gen_prompt = opened[start:]
        rest = closed[start:].strip()
        # What a finished conversation gets instead of the generation prompt (Phi-3's eos), if one token.
        self.terminator = rest if rest in atoms else ""
        self.header = self.opened_block = ""
        self._end_re: re.Pattern | None = None
        if not marked:
            self._learn_turn_shape()

    # ----------------------------------------------------------------- public

    def assistant_spans(self, messages: Messages, text: str, marks: list[Span] | None,
                        tools: list[dict] | None = None) -> list[Span]:
        """(start, end) characters of each assistant message's trained text, in message order."""
        indices = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
        if marks is not None:
            blocks = _merge_blocks(marks)
            if len(blocks) != len(indices):
                raise ValueError(f"{self.describe}: {len(blocks)} {{% generation %}} blocks for {len(indices)} "
                                 "assistant messages; cannot tell which block is whose")
            return [(self._trained_start(messages[:i], text, s, tools), self._trim_end(text, s, e))
                    for i, (s, e) in zip(indices, blocks)]
        spans = self._by_header(text, len(indices))
        if spans is None:
            spans = [self._by_prefix(messages, i, text, tools) for i in indices]
        return spans

    # ----------------------------------------------------------------- learning the template

    def _learn_turn_shape(self) -> None:
        """Header, the block the generation prompt opens, and end tokens, from probe conversations."""
        two = self.render([{"role": "user", "content": _Q1}, {"role": "assistant", "content": _A1},
                           {"role": "user", "content": _Q2}, {"role": "assistant", "content": _A2}])
        q1 = two.find(_Q1)
        a1 = two.find(_A1, q1)
        q2 = two.find(_Q2, a1)
        a2 = two.find(_A2, q2)
        if min(q1, a1, q2, a2) < 0:
            raise ValueError(f"{self.describe} drops message content (a two-turn probe renders as {two[:300]!r})")
        # The header: the longest part of the generation prompt that every rendered assistant turn repeats.
        repeated = min(_longest_prefix_within(self.gen_prompt, two[q1 + len(_Q1):a1]),
                       _longest_prefix_within(self.gen_prompt, two[q2 + len(_Q2):a2]))
        repeated = self._back_off(self.gen_prompt, repeated)
        self.header, self.opened_block = self.gen_prompt[:repeated], self.gen_prompt[repeated:]

        ends = {self._atom_ending_at(two, self._strip_terminator(two, 0, len(two))),
                self._atom_starting_at(two, a1 + len(_A1))}
        try:  # a turn that calls a tool may end differently (gpt-oss: <|call|>, GLM: <|observation|>)
            call = self.render([{"role": "user", "content": _Q1},
                                {"role": "assistant", "content": "", "tool_calls": [_PROBE_CALL]}],
                               tools=_PROBE_TOOLS)
            ends.add(self._atom_ending_at(call, self._strip_terminator(call, 0, len(call))))
        except ValueError:
            pass  # the template does not do tool calls
        ends.discard(None)
        if ends:
            self._end_re = re.compile("|".join(map(re.escape, sorted(ends, key=len, reverse=True))))

    # ----------------------------------------------------------------- templates without markers

    def _by_header(self, text: str, n: int) -> list[Span] | None:
        """Header occurrences as turn starts, the first end token as the end; None unless one per message."""
        if not self.header or self._end_re is None:
            return None
        starts = [m.start() for m in re.finditer(re.escape(self.header), text)]
        if len(starts) != n:
            return None
        spans = []
        for k, at in enumerate(starts):
            start = at + len(self.header)
            if self.opened_block and text.startswith(self.opened_block, start):
                start += len(self.opened_block)
            limit = starts[k + 1] if k + 1 < n else len(text)
            end = self._end_tokens_end(text, start, limit)
            if end is None:
                return None
            spans.append((start, end))
        return spans

    def _by_prefix(self, messages: Messages, i: int, text: str, tools: list[dict] | None) -> Span:
        """Message i's turn: from where the text leaves the rendered prompt to where it leaves the cut conversation."""
        start = self._prompt_end(messages[:i], text, tools)
        if start is None:
            raise ValueError(
                f"{self.describe}: cannot find where assistant message {i} starts (the template renders the "
                "earlier messages differently once the conversation goes on, and has no {% generation %} markers)")
        cut = self.render(messages[: i + 1], tools=tools)
        diverge = self._back_off(text, _lcp(cut, text), cut)
        end = self._trim_end(text, start, diverge)
        if self._end_re is not None and diverge < len(cut) and (m := self._end_re.match(text, end)):
            # The turn closes differently mid-conversation than at the end (gpt-oss: <|end|> vs <|return|>).
            end = self._end_tokens_end(text, m.start(), len(text)) or end
        if end <= start:
            raise ValueError(f"{self.describe}: cannot find where assistant message {i} ends")
        return start, end

    def _end_tokens_end(self, text: str, start: int, limit: int) -> int | None:
        """The end of the first end token in text[start:limit], extended over end tokens right after it."""
        m = self._end_re.search(text, start, limit)
        if m is None:
            return None
        end = m.end()
        while (nxt := self._end_re.match(text, end, limit)) is not None and nxt.end() > end:
            end = nxt.end()
        return end

    # ----------------------------------------------------------------- trimming to the convention

    def _trained_start(self, prompt_messages: Messages, text: str, start: int, tools: list[dict] | None) -> int:
        """Move a marked block's start past any generation prompt text at its beginning."""
        if text.endswith(self.gen_prompt, 0, start):
            return start  # the whole generation prompt comes before the block
        prompt_end = self._prompt_end(prompt_messages, text, tools)
        if prompt_end is not None:
            return max(start, prompt_end)
        # The earlier turns render differently in the prompt: line the generation prompt up with the block.
        before = next(j for j in range(min(len(self.gen_prompt), start), -1, -1)
                      if text.endswith(self.gen_prompt[:j], 0, start))
        rest = self.gen_prompt[before:]
        return self._back_off(text, start + _lcp(rest, text[start:start + len(rest)]))

    def _prompt_end(self, prompt_messages: Messages, text: str, tools: list[dict] | None) -> int | None:
        """Where `text` leaves the rendered generation prompt after `prompt_messages`; None if it leaves earlier."""
        if not prompt_messages:
            return None
        prompt = self.render(prompt_messages, add_generation_prompt=True, tools=tools)
        end = self._back_off(text, _lcp(prompt, text), prompt)
        return end if end >= len(prompt) - len(self.gen_prompt) else None

    def _trim_end(self, text: str, start: int, end: int) -> int:
        """Drop trailing whitespace, and the terminator a finished conversation gets, from a turn."""
        return max(start, self._strip_terminator(text, start, end))

    def _strip_terminator(self, text: str, start: int, end: int) -> int:
        end = _rstrip(text, start, end)
        if self.terminator and text.endswith(self.terminator, start, end):
            end = _rstrip(text, start, end - len(self.terminator))
        return end

    # ----------------------------------------------------------------- special-token helpers

    def _back_off(self, text: str, pos: int, other: str | None = None) -> int:
        """Move `pos` back to the start of any special token it falls inside (in `text`, and in `other`)."""
        texts = (text,) if other is None else (text, other)
        moved = self._atom_re is not None
        while moved:
            moved = False
            for t in texts:
                lo = max(0, pos - self._longest_atom + 1)
                for m in self._atom_re.finditer(t, lo, min(len(t), pos + self._longest_atom)):
                    if m.start() < pos < m.end():
                        pos, moved = m.start(), True
                        break
        return pos

    def _atom_starting_at(self, text: str, pos: int) -> str | None:
        m = self._atom_re.match(text, pos) if self._atom_re is not None else None
        return m.group() if m else None

    def _atom_ending_at(self, text: str, pos: int) -> str | None:
        return next((a for a in self._atoms if text.endswith(a, 0, pos)), None)


def _lcp(a: str, b: str) -> int:
    """Length of the longest common prefix (binary search on slice comparisons, which run in C)."""
    lo, hi = 0, min(len(a), len(b))
    if a[:hi] == b[:hi]:
        return hi
    while hi - lo > 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[lo:mid] == b[lo:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def _rstrip(text: str, start: int, end: int) -> int:
    while end > start and text[end - 1].isspace():
        end -= 1
    return end


def _longest_prefix_within(prefix_of: str, segment: str) -> int:
    """Length of the longest prefix of `prefix_of` that occurs in `segment`."""
    return next((j for j in range(len(prefix_of), 0, -1) if prefix_of[:j] in segment), 0)


def _merge_blocks(marks: list[Span]) -> list[Span]:
    """Drop empty generation blocks and merge blocks that touch (content + end token written separately)."""
    blocks: list[list[int]] = []
    for s, e in marks:
        if e <= s:
            continue
        if blocks and blocks[-1][1] == s:
            blocks[-1][1] = e
        else:
            blocks.append([s, e])
    return [(s, e) for s, e in blocks]
