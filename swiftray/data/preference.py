"""Preference data: ms-swift's pair and KTO row formats, their encoding, and the batches the losses read.

Pair rows (DPO, ORPO, CPO, SimPO, RM) become ``{"messages": chosen conversation, "rejected_messages":
rejected conversation, **other columns}``; accepted formats (ms-swift's "Custom dataset" RLHF section, and
TRL's preference format):

- ``messages`` (or any SFT row format) plus ``rejected_response``: a string, or a list of messages, that
  replaces everything after the last user turn of ``messages`` (ms-swift's rule);
- ``messages`` plus ``rejected_messages``: the whole rejected conversation (the row's ``system`` column
  applies to both);
- ``chosen`` and ``rejected``: strings or message lists, after an optional prompt (``prompt``/``query``
  ... as a string or a message list, or ``messages`` ending on a user turn); without a prompt they must
  be whole conversations (TRL's implicit prompt).

An optional ``margin`` column (reward models) must be a number. KTO rows are any SFT row plus ``label``:
true/false, 1/0 or their strings. Every problem is a ``DatasetFormatError`` naming file, line and field.

Encoding: a side's prompt is its conversation up to the last user turn, encoded with the generation
prompt as at inference (``Template.encode_prompt``); its completion is what follows, up to the final
eos, with the template's SFT labels (``--loss_scale``). Rows are laid out chosen, rejected, chosen,
rejected ... (KTO: example, its mismatched KL completion ...), with ``prompt_lens``: a pair is a group of
two completions sharing a prompt, so prompt sharing (``models/prompt_sharing.py``) computes the prompt
once, and any even split of the rows (``experience.split_for_ranks``) keeps pairs whole.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Sequence
from typing import Any

import torch
from datasets import Dataset

from swiftray.data.formats import (
    CONVERSATION_COLUMNS,
    QUERY_ALIASES,
    DatasetFormatError,
    location,
    normalize_row,
    read_conversation,
)
from swiftray.data.packing import IGNORE_INDEX, collate
from swiftray.data.template import SampleTooLongError, Template

logger = logging.getLogger("swiftray")

# Columns the pair formats consume; the loader drops them once no row holds a value.
PREFERENCE_COLUMNS = ("chosen", "rejected", "rejected_response", "rejected_messages")
_TRUE, _FALSE = ("true", "1"), ("false", "0")


def _fail(where: str, field: str, problem: str, reason: str) -> DatasetFormatError:
    return DatasetFormatError(f"{where}, field '{field}': {problem}", reason)


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def _ends_with_answer(messages: list[dict], where: str, field: str) -> None:
    if not any(m["role"] == "user" for m in messages):
        raise _fail(where, field, "no user turn; expected at least one user message", "no user turn")
    if messages[-1]["role"] != "assistant":
        raise _fail(where, field, f"the conversation ends with a {messages[-1]['role']} turn; expected a final "
                    "assistant message", "no assistant turn")


def _last_user(messages: list[dict]) -> int:
    return max(i for i, m in enumerate(messages) if m["role"] == "user")


def _response_turns(value: Any, where: str, field: str) -> list[dict]:
    """A response given as a string (one assistant turn) or a list of messages."""
    if isinstance(value, str):
        if not value.strip():
            raise _fail(where, field, "empty response; expected non-empty text", "empty content")
        return [{"role": "assistant", "content": value}]
    if isinstance(value, list | tuple):
        turns = read_conversation(list(value), field, where)
        if not turns:
            raise _fail(where, field, "empty list; expected at least one assistant message", "empty content")
        return turns
    raise _fail(where, field, f"expected a string or a list of messages, got {type(value).__name__}", "bad value")


def _with_system(messages: list[dict], row: dict, where: str) -> list[dict]:
    system = row.get("system")
    if _missing(system) or (messages and messages[0]["role"] == "system"):
        return messages
    if not isinstance(system, str):
        raise _fail(where, "system", f"expected a string, got {type(system).__name__}", "bad value")
    return ([{"role": "system", "content": system}] if system.strip() else []) + messages


def _check_margin(row: dict, out: dict, where: str) -> None:
    value = row.get("margin")
    if _missing(value):
        return
    try:
        if isinstance(value, bool):
            raise ValueError
        out["margin"] = float(value)
    except (TypeError, ValueError):
        raise _fail(where, "margin", f"expected a number, got {value!r:.50}", "bad value") from None


def _prompt_of(row: dict, where: str, **kw: Any) -> list[dict]:
    """The explicit prompt of a chosen/rejected row: a prompt message list, an SFT-style prompt, or none."""
    if isinstance(row.get("prompt"), list | tuple):
        return _with_system(read_conversation(list(row["prompt"]), "prompt", where), row, where)
    prompt_columns = (*CONVERSATION_COLUMNS, *QUERY_ALIASES)
    if not any(not _missing(row.get(c)) for c in prompt_columns):
        return []
    prompt = normalize_row({k: row[k] for k in (*prompt_columns, "system", "history") if k in row},
                           allow_no_response=True, **kw)["messages"]
    if prompt[-1]["role"] == "assistant":
        field = next(c for c in prompt_columns if not _missing(row.get(c)))
        raise _fail(where, field, "the prompt ends with an assistant turn; with 'chosen'/'rejected' columns "
                    "the prompt must end on a user turn", "bad prompt")
    return prompt


def _from_chosen_rejected(row: dict, where: str, **kw: Any) -> dict:
    if _missing(row.get("rejected")):
        raise _fail(where, "rejected", "missing the rejected side; a 'chosen' column needs a 'rejected' one",
                    "no rejected response")
    prompt = _prompt_of(row, where, **kw)
    sides = {}
    for field in ("chosen", "rejected"):
        value = row[field]
        if isinstance(value, str) and not prompt:
            raise _fail(where, field, "a string response needs a prompt column "
                        f"({', '.join(('prompt', 'messages') + QUERY_ALIASES[:1])} ...); or give whole "
                        "conversations as message lists", "no prompt")
        sides[field] = _with_system(prompt + _response_turns(value, where, field), row, where)
        _ends_with_answer(sides[field], where, field)
    consumed = {"chosen", "rejected", "system", "history", *CONVERSATION_COLUMNS, *QUERY_ALIASES}
    out = {k: v for k, v in row.items() if k not in consumed}
    out["messages"], out["rejected_messages"] = sides["chosen"], sides["rejected"]
    return out


def normalize_pair_row(row: dict[str, Any], *, source: str = "<row>", index: int = 0, line: int | None = None,
                       allow_no_response: bool = False) -> dict[str, Any]:
    """A preference pair row -> ``{"messages", "rejected_messages", **other columns}`` (see the module
    docstring). Same keywords as ``formats.normalize_row``, so the loader calls either."""
    where = location(source, index, line)
    kw = dict(source=source, index=index, line=line)
    if not _missing(row.get("chosen")):
        out = _from_chosen_rejected(row, where, **kw)
    else:
        out = normalize_row(row, **kw)
        chosen = out["messages"]
        if not _missing(row.get("rejected_messages")):
            rejected = _with_system(read_conversation(row["rejected_messages"], "rejected_messages", where), row,
                                    where)
            _ends_with_answer(rejected, where, "rejected_messages")
        elif not _missing(row.get("rejected_response")):
            turns = _response_turns(row["rejected_response"], where, "rejected_response")
            rejected = chosen[: _last_user(chosen) + 1] + turns
            if rejected == chosen:
                raise _fail(where, "rejected_response", "the rejected response is the chosen one; expected a "
                            "different response", "identical pair")
            _ends_with_answer(rejected, where, "rejected_response")
        else:
            raise _fail(where, "rejected_response", "missing the rejected side; expected a 'rejected_response' "
                        "(a string or assistant messages) or 'rejected_messages' column", "no rejected response")
        out.pop("rejected_response", None)
        out["rejected_messages"] = rejected
    _check_margin(row, out, where)
    return out


# Columns normalize_pair_row adds to every row: the loader gives its error placeholders them too.
normalize_pair_row.added_columns = ("rejected_messages",)  # type: ignore[attr-defined]


def parse_kto_label(value: Any, where: str) -> bool:
    """KTO's ``label``: a bool, 1/0, or "true"/"false"/"1"/"0" (any case); anything else is an error."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int | float) and not _missing(value) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE + _FALSE:
        return value.strip().lower() in _TRUE
    shown = "missing" if _missing(value) else f"got {value!r:.50}"
    raise _fail(where, "label", f"{shown}; expected a boolean: true/false (or 1/0) marking the response "
                "desirable or not", "bad label")


def normalize_kto_row(row: dict[str, Any], *, source: str = "<row>", index: int = 0, line: int | None = None,
                      allow_no_response: bool = False) -> dict[str, Any]:
    """A KTO row -> ``{"messages", "label": bool, **other columns}``."""
    where = location(source, index, line)
    out = normalize_row(row, source=source, index=index, line=line)
    out["label"] = parse_kto_label(row.get("label"), where)
    return out


# ---------------------------------------------------------------------------------------- encoding


def encode_side(template: Template, messages: list[dict]) -> tuple[list[int], list[int], list[int]]:
    """(prompt ids, completion ids, completion labels) of one conversation. The completion ends at its last
    trained token (the template's text after the final eos is dropped). Truncated to the template's
    max_length: ``delete`` raises SampleTooLongError, ``right`` cuts the completion's end, ``left`` the
    prompt's start (a side that would lose its whole prompt or completion is too long either way)."""
    split = _last_user(messages) + 1
    full_template = copy.copy(template)
    full_template.max_length = None
    prompt = full_template.encode_prompt(messages[:split])
    full = full_template.encode(messages)
    if full["input_ids"][: len(prompt)] != prompt:
        raise ValueError("the chat template does not render the prompt as a prefix of the whole conversation, "
                         "so the prompt's tokens cannot be shared by chosen and rejected")
    completion, labels = full["input_ids"][len(prompt):], full["labels"][len(prompt):]
    trained = [i for i, label in enumerate(labels) if label != IGNORE_INDEX]
    if trained:  # end at the eos, as a generated completion does (a reward model scores the last token)
        completion, labels = completion[: trained[-1] + 1], labels[: trained[-1] + 1]
    limit, total = template.max_length, len(prompt) + len(completion)
    if limit is not None and total > limit:
        strategy = template.truncation_strategy
        if strategy == "right" and limit > len(prompt):
            completion, labels = completion[: limit - len(prompt)], labels[: limit - len(prompt)]
        elif strategy == "left" and total - limit < len(prompt):
            prompt = prompt[total - limit:]
        else:
            raise SampleTooLongError(total, limit)
    return prompt, completion, labels


def encode_pair(template: Template, row: dict[str, Any]) -> dict[str, Any]:
    """A normalised pair row -> prompt and completion ids/labels of both sides (+ ``margin`` if any)."""
    prompt, chosen, chosen_labels = encode_side(template, row["messages"])
    rejected_prompt, rejected, rejected_labels = encode_side(template, row["rejected_messages"])
    out = {"prompt_ids": prompt, "chosen_ids": chosen, "chosen_labels": chosen_labels,
           "rejected_prompt_ids": rejected_prompt, "rejected_ids": rejected, "rejected_labels": rejected_labels}
    if row.get("margin") is not None:
        out["margin"] = float(row["margin"])
    return out


def encode_kto_example(template: Template, row: dict[str, Any]) -> dict[str, Any]:
    """A normalised KTO row -> prompt and completion ids/labels and ``label``."""
    prompt, completion, labels = encode_side(template, row["messages"])
    return {"prompt_ids": prompt, "completion_ids": completion, "completion_labels": labels,
            "label": bool(row["label"])}


def _has_loss(labels: Sequence[int]) -> bool:
    return any(label != IGNORE_INDEX for label in labels)


def encode_preference_dataset(ds: Dataset, template: Template, *, kind: str = "pairs", num_proc: int = 1,
                              name: str = "train") -> list[dict[str, Any]]:
    """Encode every row (``kind`` "pairs" or "kto") through ``datasets.map``; rows over max_length, and rows
    with a side that has no loss token, are skipped with a logged count (as ``encode_dataset`` does)."""
    if kind not in ("pairs", "kto"):
        raise ValueError(f"kind must be 'pairs' or 'kto', got {kind!r}")
    encode_one = encode_pair if kind == "pairs" else encode_kto_example

    def encode(row: dict[str, Any]) -> dict[str, Any]:
        try:
            return {"encoded": encode_one(template, row), "too_long": False}
        except SampleTooLongError:
            return {"encoded": None, "too_long": True}

    encoded = ds.map(encode, num_proc=num_proc if num_proc > 1 else None, remove_columns=ds.column_names,
                     desc=f"tokenising {name}")
    samples, too_long, no_loss = [], 0, 0
    for row in encoded:
        if row["too_long"]:
            too_long += 1
            continue
        sample = {k: v for k, v in row["encoded"].items() if v is not None}
        label_keys = ("chosen_labels", "rejected_labels") if kind == "pairs" else ("completion_labels",)
        if not all(_has_loss(sample[k]) for k in label_keys):
            no_loss += 1
            continue
        samples.append(sample)
    if too_long:
        logger.warning("skipped %d of %d %s rows longer than --max_length %s (--truncation_strategy delete; use "
                       "left or right to keep them)", too_long, len(encoded), name, template.max_length)
    if no_loss:
        logger.warning("skipped %d %s rows with a response that has no loss tokens under --loss_scale", no_loss, name)
    return samples


def add_kto_kl_completions(examples: list[dict[str, Any]], batch_size: int,
                           max_length: int | None = None) -> list[dict[str, Any]]:
    """Give each KTO example a mismatched completion for the KL estimate: within each run of ``batch_size``
    examples (ms-swift uses the global batch), example i gets example i-1's completion (the first, the
    last one's), as ms-swift and TRL rotate. ``max_length`` cuts a KL row's completion to fit."""
    if batch_size < 2:
        raise ValueError("KTO's KL estimate needs a batch of at least 2 examples (with 1 it equals the reward)")
    out = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        for i, example in enumerate(chunk):
            other = chunk[i - 1]  # i = 0 takes the chunk's last
            keep = len(other["completion_ids"])
            if max_length is not None:
                keep = min(keep, max(1, max_length - len(example["prompt_ids"])))
            out.append({**example, "kl_ids": other["completion_ids"][:keep],
                        "kl_labels": other["completion_labels"][:keep]})
    return out


# ---------------------------------------------------------------------------------------- batches


def _rows(prompts: list[list[int]], completions: list[list[int]], labels: list[list[int]],
          pad_token_id: int) -> dict[str, torch.Tensor]:
    samples = [{"input_ids": p + c, "labels": [IGNORE_INDEX] * len(p) + list(lab)}
               for p, c, lab in zip(prompts, completions, labels)]
    batch = collate(samples, pad_token_id=pad_token_id, packing=False)
    batch["prompt_lens"] = torch.tensor([len(p) for p in prompts], dtype=torch.long)
    return batch


def preference_batch(pairs: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Encoded pairs -> right-padded rows chosen_0, rejected_0, chosen_1, ... with ``input_ids``,
    ``labels`` (the template's, -100 on prompts), ``attention_mask``, ``prompt_lens`` ``[2P]``, and
    ``margin`` ``[P]`` when every pair has one (``preference_math.split_pairs`` takes the rows apart)."""
    if not pairs:
        raise ValueError("preference_batch got no pairs")
    prompts, completions, labels = [], [], []
    for pair in pairs:
        prompts += [pair["prompt_ids"], pair.get("rejected_prompt_ids", pair["prompt_ids"])]
        completions += [pair["chosen_ids"], pair["rejected_ids"]]
        labels += [pair["chosen_labels"], pair["rejected_labels"]]
    batch = _rows(prompts, completions, labels, pad_token_id)
    if all(p.get("margin") is not None for p in pairs):
        batch["margin"] = torch.tensor([p["margin"] for p in pairs], dtype=torch.float32)
    return batch


def kto_batch(examples: list[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """KTO examples (with ``add_kto_kl_completions``) -> rows example_0, kl_0, example_1, ... sharing each
    prompt, and ``desirable`` ``[B]`` (bool). The even rows feed ``kto_loss``, the odd ones
    ``kto_kl_estimate``."""
    if not examples:
        raise ValueError("kto_batch got no examples")
    missing = [i for i, e in enumerate(examples) if "kl_ids" not in e]
    if missing:
        raise ValueError(f"examples {missing[:5]} have no KL completion; call add_kto_kl_completions first")
    prompts, completions, labels = [], [], []
    for e in examples:
        prompts += [e["prompt_ids"], e["prompt_ids"]]
        completions += [e["completion_ids"], e["kl_ids"]]
        labels += [e["completion_labels"], e["kl_labels"]]
    batch = _rows(prompts, completions, labels, pad_token_id)
    batch["desirable"] = torch.tensor([bool(e["label"]) for e in examples])
    return batch
