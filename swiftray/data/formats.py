"""Row formats: every supported dataset row becomes one internal form.

The internal form is ``{"messages": [{"role": ..., "content": ...}, ...], **other columns}``
with roles ``system``, ``user``, ``assistant`` and ``tool`` and string contents. Columns that
are not part of a row format (``solution``, ``rejected_response``, ...) pass through untouched,
because reward functions and preference trainers read them.

Accepted row formats (ms-swift's names):

- ``messages``: a list of ``{"role", "content"}`` dicts (OpenAI style; ``tool_calls`` kept as a
  JSON string in ``content``).
- ShareGPT: ``conversations`` / ``conversation``, a list of ``{"from", "value"}`` dicts with roles
  human/gpt/system/tool (user/assistant also accepted).
- query/response: ``query`` (aliases prompt, instruction, question, problem, input), ``response``
  (aliases output, answer), optional ``system`` and ``history`` (a list of ``[query, response]``).
  Alpaca's ``instruction`` + ``input`` become one query, ``"{instruction}\\n{input}"``.

Every problem raises a :class:`DatasetFormatError` naming the file, the line (JSON lines) or the
row index (other files), the field, and what was expected.
"""

from __future__ import annotations

import json
import math
from typing import Any

ROLES = ("system", "user", "assistant", "tool")

# ShareGPT and agent datasets spell roles in several ways; all map onto the four roles above.
# An assistant's tool call stays an assistant turn whose content is the call as a JSON string.
ROLE_ALIASES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "tool_call": "assistant",
    "function_call": "assistant",
    "tool": "tool",
    "tool_response": "tool",
    "observation": "tool",
    "function": "tool",
}

CONVERSATION_COLUMNS = ("messages", "conversations", "conversation")
QUERY_ALIASES = ("query", "prompt", "instruction", "question", "problem", "input")
RESPONSE_ALIASES = ("response", "output", "answer")
# Every column a row format may consume; the loader drops these once they are read.
FORMAT_COLUMNS = (*CONVERSATION_COLUMNS, *QUERY_ALIASES, *RESPONSE_ALIASES, "system", "history")

ACCEPTED_FORMATS = (
    "'messages'; 'conversations' or 'conversation' (ShareGPT); or a query column "
    f"({', '.join(QUERY_ALIASES)}) with a response column ({', '.join(RESPONSE_ALIASES)}), "
    "optionally 'system' and 'history'"
)


class DatasetFormatError(ValueError):
    """A dataset row (or file) that cannot be read; ``reason`` is a short category for skip counts."""

    def __init__(self, message: str, reason: str = "bad row") -> None:
        super().__init__(message)
        self.message = message
        self.reason = reason

    def __str__(self) -> str:
        return self.message

    def __reduce__(self):  # keep ``reason`` when the error crosses a process boundary
        return (self.__class__, (self.message, self.reason))


def location(source: str, index: int = 0, line: int | None = None) -> str:
    """Where a row lives: ``data.jsonl line 7`` for JSON lines, ``data.csv row index 5`` otherwise."""
    return f"{source} line {line}" if line is not None else f"{source} row index {index}"


def _fail(where: str, field: str, problem: str, reason: str) -> DatasetFormatError:
    return DatasetFormatError(f"{where}, field '{field}': {problem}", reason)


def _is_missing(value: Any) -> bool:
    # CSV readers give NaN for an empty cell; treat it as absent like None.
    return value is None or (isinstance(value, float) and math.isnan(value))


def _as_text(value: Any, where: str, field: str) -> str | None:
    """Coerce a content value to a string (None stays None so that emptiness is reported once)."""
    if _is_missing(value):
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, bool | int | float):
        return str(value)  # e.g. an answer column that the CSV reader parsed as a number
    if isinstance(value, list) and all(isinstance(p, dict) and p.get("type") == "text" for p in value):
        return "".join(str(p.get("text") or "") for p in value)  # OpenAI content parts, text only
    if isinstance(value, dict | list):
        return json.dumps(value, ensure_ascii=False)
    raise _fail(where, field, f"expected a string, got {type(value).__name__}", "bad value")


def _as_list(value: Any, where: str, field: str, what: str) -> list:
    """A list column; CSV files hold them as JSON strings, so those are decoded here."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise _fail(
                where, field, f"expected {what} (a JSON list in a string is accepted): {e}", "bad value"
            ) from e
    if isinstance(value, tuple):
        value = list(value)
    if not isinstance(value, list):
        raise _fail(where, field, f"expected {what}, got {type(value).__name__}", "bad value")
    return value


def _read_turns(value: Any, column: str, where: str) -> list[dict[str, str | None]]:
    """Messages or ShareGPT turns -> [{"role", "content"}] with canonical roles."""
    turns = _as_list(value, where, column, "a list of {'role', 'content'} dicts")
    out = []
    for i, turn in enumerate(turns):
        field = f"{column}[{i}]"
        if not isinstance(turn, dict):
            raise _fail(
                where, field, f"expected a dict with role and content, got {type(turn).__name__}", "bad value"
            )
        role_key = "role" if "role" in turn else "from"
        raw_role = turn.get(role_key)
        if raw_role is None:
            raise _fail(
                where, f"{field}.role", "missing role (expected a 'role' or 'from' key)", "unknown role"
            )
        role = ROLE_ALIASES.get(str(raw_role).strip().lower())
        if role is None:
            raise _fail(
                where,
                f"{field}.{role_key}",
                f"unknown role {raw_role!r}; expected one of "
                f"{', '.join(ROLES)} (or {', '.join(k for k in ROLE_ALIASES if k not in ROLES)})",
                "unknown role",
            )
        content_key = "content" if "content" in turn else "value"
        content = _as_text(turn.get(content_key), where, f"{field}.{content_key}")
        if _is_blank(content) and turn.get("tool_calls"):
            content = _as_text(turn["tool_calls"], where, f"{field}.tool_calls")
        out.append({"role": role, "content": content, "field": f"{field}.{content_key}"})
    return out


def _is_blank(text: str | None) -> bool:
    return text is None or not text.strip()


def _first_present(row: dict, names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in row and not _is_missing(row[n])), None)


def _read_query_response(row: dict, where: str) -> tuple[list[dict], set[str]]:
    """query/response/history rows (and their aliases) -> turns, plus the columns consumed."""
    consumed = {n for n in (*QUERY_ALIASES, *RESPONSE_ALIASES, "history") if n in row}
    if _first_present(row, ("instruction",)) and _first_present(row, ("input",)):
        instruction = _as_text(row["instruction"], where, "instruction") or ""
        extra = _as_text(row["input"], where, "input") or ""
        # Alpaca: the input is the instruction's argument, so both form the query.
        query, query_field = (f"{instruction}\n{extra}" if extra.strip() else instruction), "instruction"
    else:
        query_field = _first_present(row, QUERY_ALIASES)
        query = _as_text(row[query_field], where, query_field)
    turns: list[dict] = []
    if not _is_missing(row.get("history")):
        for i, pair in enumerate(
            _as_list(row["history"], where, "history", "a list of [query, response] pairs")
        ):
            field = f"history[{i}]"
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise _fail(where, field, "expected a [query, response] pair", "bad value")
            turns.append({"role": "user", "content": _as_text(pair[0], where, field), "field": f"{field}[0]"})
            turns.append(
                {"role": "assistant", "content": _as_text(pair[1], where, field), "field": f"{field}[1]"}
            )
    turns.append({"role": "user", "content": query, "field": query_field})
    response_field = _first_present(row, RESPONSE_ALIASES)
    if response_field is not None:
        response = _as_text(row[response_field], where, response_field)
        turns.append({"role": "assistant", "content": response, "field": response_field})
    return turns, consumed


def _clean_turns(turns: list[dict], where: str) -> list[dict[str, str]]:
    """Drop blank system turns; any other blank turn is an error."""
    messages = []
    for turn in turns:
        if _is_blank(turn["content"]):
            if turn["role"] == "system":
                continue  # an empty system prompt means "no system prompt"
            raise _fail(
                where,
                turn["field"],
                f"empty content in the {turn['role']} turn; expected non-empty text",
                "empty content",
            )
        messages.append({"role": turn["role"], "content": turn["content"]})
    return messages


def read_conversation(value: Any, column: str, where: str) -> list[dict[str, str]]:
    """A conversation held in another column (``rejected_messages``, ``chosen`` ...), read and checked
    like ``messages``; errors name ``column``. No rule on which roles it must hold."""
    return _clean_turns(_read_turns(value, column, where), where)


def normalize_row(
    row: dict[str, Any],
    *,
    source: str = "<row>",
    index: int = 0,
    allow_no_response: bool = False,
    line: int | None = None,
) -> dict[str, Any]:
    """Return ``row`` in the internal form: ``messages`` plus every non-format column, unchanged.

    ``source``, ``index`` (0-based row index) and ``line`` (1-based line of a JSON-lines file) only
    serve the error message. A row may end on a user turn only when ``allow_no_response`` (GRPO
    prompts); otherwise it must end with an assistant turn.
    """
    where = location(source, index, line)
    conversation = _first_present(row, CONVERSATION_COLUMNS)
    if conversation is not None:
        turns, consumed = _read_turns(row[conversation], conversation, where), {conversation}
    elif _first_present(row, QUERY_ALIASES) is not None:
        turns, consumed = _read_query_response(row, where)
    else:
        present = [k for k, v in row.items() if not _is_missing(v)]
        raise _fail(
            where,
            "<columns>",
            f"row matches none of the known formats; it has columns {present}; expected {ACCEPTED_FORMATS}",
            "unknown format",
        )

    if "system" in row:
        consumed.add("system")
        system = _as_text(row["system"], where, "system")
        if not _is_blank(system) and not (turns and turns[0]["role"] == "system"):
            turns.insert(0, {"role": "system", "content": system, "field": "system"})

    messages = _clean_turns(turns, where)
    if not any(m["role"] == "user" for m in messages):
        raise _fail(
            where, conversation or "query", "no user turn; expected at least one user message", "no user turn"
        )
    if not allow_no_response and messages[-1]["role"] != "assistant":
        field = conversation or "response"
        raise _fail(
            where,
            field,
            f"no assistant turn at the end (last turn is {messages[-1]['role']}); expected a "
            f"final assistant message (or a {'/'.join(RESPONSE_ALIASES)} column)",
            "no assistant turn",
        )

    out = {k: v for k, v in row.items() if k not in consumed}
    out["messages"] = messages
    return out
