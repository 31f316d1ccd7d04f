"""The RL driver's small helpers: prompt encoding and order, plug-in shipping, readable errors."""

from __future__ import annotations

import logging
import random
from typing import Any

from datasets import Dataset

from swiftray.data.template import SampleTooLongError, Template

logger = logging.getLogger("swiftray")


def encode_prompts(ds: Dataset, template: Template, with_responses: bool = False) -> list[dict[str, Any]]:
    """Each row's prompt token ids (the conversation up to the last user turn) plus its other columns.

    Prompts over --max_length are skipped with a logged count (--truncation_strategy delete).
    `with_responses`: rows that end with an assistant turn also get its tokens as `response_ids`, as
    the template lays them out after the prompt (what an algorithm trains on in place of a rollout).
    """
    rows, too_long = [], 0
    for row in ds:
        messages = list(row["messages"])
        answered = bool(messages) and messages[-1]["role"] == "assistant"
        if answered:
            messages = messages[:-1]  # GRPO generates the last answer itself
        try:
            prompt_ids = template.encode_prompt(messages)
            extra = {"response_ids": response_ids(template, row["messages"], prompt_ids)} if with_responses else {}
        except SampleTooLongError:
            too_long += 1
            continue
        rows.append({**row, "messages": messages, "prompt_ids": prompt_ids, **extra})
    if too_long:
        logger.warning("skipped %d of %d prompts longer than --max_length %s", too_long, len(ds),
                       template.max_length)
    return rows


def response_ids(template: Template, messages: list[dict[str, Any]], prompt_ids: list[int]) -> list[int] | None:
    """The last assistant turn's tokens, through its last labelled one, when the whole conversation's
    encoding starts with `prompt_ids`; None for a row without a response (or a template that
    renders the prompt differently inside the conversation)."""
    if not messages or messages[-1]["role"] != "assistant":
        return None
    encoded = template.encode(messages)
    ids, labels = encoded["input_ids"], encoded["labels"]
    if ids[:len(prompt_ids)] != prompt_ids:
        return None
    labelled = [i for i in range(len(prompt_ids), len(ids)) if labels[i] != -100]
    return ids[len(prompt_ids):labelled[-1] + 1] if labelled else None


class PromptSampler:
    """Indices in a per-epoch shuffled order (seed + epoch), resumable from (epoch, position)."""

    def __init__(self, size: int, seed: int, shuffle: bool = True):
        if size == 0:
            raise ValueError("no prompts in the training data")
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.position = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, k: int) -> list[int]:
        out = []
        while len(out) < k:
            if self.position >= self.size:
                self.epoch, self.position = self.epoch + 1, 0
                self._order = self._make_order()
            n = min(k - len(out), self.size - self.position)
            out += self._order[self.position:self.position + n]
            self.position += n
        return out

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.position = int(state["epoch"]), int(state["position"])
        self._order = self._make_order()


def ship_plugins_by_value() -> None:
    """Let what plug-in files define (an algorithm class, say) travel to other processes.

    load_external_plugins imports each file under a generated module name that no other process
    has, so pickling its classes by reference fails there; by value, they arrive whole.
    """
    import sys

    from ray import cloudpickle

    for name, module in list(sys.modules.items()):
        if name.startswith("swiftray_plugin_"):  # the names load_external_plugins gives
            cloudpickle.register_pickle_by_value(module)


def readable_error(err: BaseException) -> BaseException:
    """The exception an actor or task raised, out of Ray's RayTaskError wrapping (which repeats the
    remote traceback in its message). The wrapping stays attached as __cause__ for debugging."""
    import ray

    cause = err
    while isinstance(cause, ray.exceptions.RayTaskError) and isinstance(getattr(cause, "cause", None),
                                                                         BaseException):
        cause = cause.cause
    return cause
