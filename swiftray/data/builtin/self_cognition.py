"""``swift/self-cognition``: teach a model its name and its author.

The question/answer pairs live in ``self_cognition.jsonl`` (English and Chinese, tagged ``en`` /
``zh``) with ``{{NAME}}`` and ``{{AUTHOR}}`` placeholders, filled from ``--model_name`` and
``--model_author``. As in ms-swift, each takes ``[zh_value, en_value]``; one value serves both.

Subsets, following ms-swift:

- ``default``: the pairs as they are.
- ``qwen3``: the question ends with `` /no_think`` and the answer starts with an empty think block
  (``<think>\\n\\n</think>\\n\\n``), Qwen3's non-thinking mode.
- ``empty_think``: only the empty think block before the answer.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

_DATA = Path(__file__).with_name("self_cognition.jsonl")
EMPTY_THINK = "<think>\n\n</think>\n\n"

# subset -> (suffix added to the question, prefix added to the answer)
SUBSETS: dict[str, tuple[str, str]] = {
    "default": ("", ""),
    "qwen3": (" /no_think", EMPTY_THINK),
    "empty_think": ("", EMPTY_THINK),
}

# Rephrasings kept out of the training pairs, to check that a trained model generalises its identity.
SELF_COGNITION_HELDOUT: tuple[str, ...] = (
    "Could you tell me who you are?",
    "Mind telling me your name?",
    "Which organization built you?",
    "Give me a quick intro about yourself.",
    "What name do you go by?",
    "Who exactly am I chatting with?",
    "Tell me, who is behind your development?",
    "I'd like to know your identity. Who are you, in a few words?",
    "Who made you, and what do you call yourself?",
    "Could you share your name with me?",
)


def load_pairs() -> list[dict[str, str]]:
    """The raw pairs: ``{"query", "response", "tag"}`` with placeholders unfilled."""
    with open(_DATA, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def _zh_en(value: str | Sequence[str] | None, flag: str) -> tuple[str, str]:
    if value is None:
        raise ValueError(
            f"swift/self-cognition needs {flag} (e.g. {flag} 小黄 'Xiao Huang'): "
            "its answers name the model and its author"
        )
    if isinstance(value, str):
        return value, value
    values = [v for v in value if v is not None]
    if len(values) not in (1, 2):
        raise ValueError(f"{flag} takes one value or two ([zh, en]), got {list(value)}")
    return values[0], values[-1]


def make_self_cognition(
    subset: str = "default",
    *,
    model_name: str | Sequence[str] | None = None,
    model_author: str | Sequence[str] | None = None,
) -> list[dict]:
    """Rows ``{"messages": [user, assistant]}`` with the name and author filled in."""
    if subset not in SUBSETS:
        raise ValueError(f"swift/self-cognition has no subset {subset!r}; choose from {sorted(SUBSETS)}")
    suffix, prefix = SUBSETS[subset]
    names, authors = _zh_en(model_name, "--model_name"), _zh_en(model_author, "--model_author")
    rows = []
    for pair in load_pairs():
        lang = 0 if pair["tag"] == "zh" else 1
        texts = []
        for text in (pair["query"], pair["response"]):
            texts.append(text.replace("{{NAME}}", names[lang]).replace("{{AUTHOR}}", authors[lang]))
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": texts[0] + suffix},
                    {"role": "assistant", "content": prefix + texts[1]},
                ]
            }
        )
    return rows
