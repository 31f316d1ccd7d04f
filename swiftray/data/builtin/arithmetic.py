"""``swiftray/arithmetic``: word problems for the SFT and GRPO demos, generated from a seed.

Levels set the difficulty:

0. one or two steps (``+``, ``-``) with one-digit numbers: small enough for the demo's tiny
   model to learn on two CPU cores in minutes (subsets ``easy_train``, ``easy_val``, ``easy_test``);
1. one step, ``+`` or ``-``, numbers below 100;
2. one step, ``+``/``-`` with 3-digit numbers or ``*`` of a 1-digit by a 2-digit number;
3. two steps (``a + b - c``, ``a * b + c``, ...) with 1- to 3-digit numbers.

Each row: ``messages`` (the question; the answer as
``<think>\\n23 + 15 = 38\\n</think>\\n\\n<answer>38</answer>``),
``solution`` (``"38"``) and ``level``. Every problem is unique by its arithmetic, and the ``test``
subset shares no arithmetic with ``train``, so test accuracy measures more than recall.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Iterable

DEFAULT_SEED = 20240601
SPLIT_SIZES = {"train": 5000, "test": 500}
# Level 0 has about 2,000 distinct problems; one shuffled pool of them is cut into three
# disjoint parts: the demo trains on easy_train, stops SFT on easy_val, reports easy_test.
EASY_SPLITS = {"easy_train": (0, 1200), "easy_val": (1200, 1300), "easy_test": (1300, 1600)}

NAMES = (
    "Tom",
    "Anna",
    "Ben",
    "Maria",
    "Li Wei",
    "Sara",
    "Omar",
    "Yuki",
    "Lena",
    "Carlos",
    "Priya",
    "Jack",
    "Chen",
    "Fatima",
    "Noah",
    "Emma",
)
ITEMS = (
    "apples",
    "marbles",
    "stickers",
    "pencils",
    "books",
    "cookies",
    "coins",
    "stamps",
    "cards",
    "shells",
    "toys",
    "balloons",
    "eggs",
    "flowers",
    "beads",
    "oranges",
)
CONTAINERS = ("bags", "boxes", "packs", "baskets", "jars")

# kind -> question templates; {a}, {b}, {c} are the numbers in the order they are used.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "add": (
        "{name} has {a} {item} and buys {b} more. How many {item} does {name} have now?",
        "There are {a} {item} in a basket. {name} adds {b} more. How many {item} are in the basket now?",
        "{name} collected {a} {item} on Monday and {b} {item} on Tuesday. How many {item} did {name} "
        "collect in total?",
    ),
    "sub": (
        "{name} has {a} {item} and gives {b} to a friend. How many {item} does {name} have left?",
        "A shop had {a} {item}. It sold {b} of them. How many {item} does the shop have left?",
        "{name} had {a} {item} but lost {b}. How many {item} remain?",
    ),
    "mul": (
        "{name} buys {a} {box} with {b} {item} in each. How many {item} does {name} buy in total?",
        "There are {a} rows of {item} with {b} {item} in each row. How many {item} are there?",
    ),
    "add_sub": (
        "{name} has {a} {item}, buys {b} more, and then gives away {c}. How many {item} does {name} "
        "have now?",
    ),
    "sub_add": (
        "{name} had {a} {item}, lost {b}, and then found {c}. How many {item} does {name} have now?",
    ),
    "add_add": (
        "{name} has {a} {item}. {name} gets {b} more from a friend and {c} more from a shop. How many {item} "
        "does {name} have now?",
    ),
    "mul_add": (
        "{name} buys {a} {box} with {b} {item} in each and already had {c} {item}. How many {item} does "
        "{name} have now?",
    ),
    "mul_sub": (
        "{name} buys {a} {box} with {b} {item} in each and then gives away {c} {item}. How many {item} are "
        "left?",
    ),
}

_OPS = {"add": "+", "sub": "-", "mul": "*"}


def _numbers(kind: str, level: int, rng: random.Random) -> tuple[int, ...]:
    """Operands for one problem; subtractions never go below zero."""
    r = rng.randint
    if level == 0:
        a, b = r(1, 9), r(1, 9)
        if kind in ("sub", "sub_add"):
            a, b = max(a, b), min(a, b)
        if kind == "add_sub":
            return a, b, r(1, min(9, a + b))
        return (a, b) if kind in ("add", "sub") else (a, b, r(1, 9))
    if level == 1:
        a, b = r(2, 99), r(2, 99)
        return (max(a, b), min(a, b)) if kind == "sub" else (a, b)
    if level == 2:
        if kind == "mul":
            return r(2, 9), r(11, 99)
        a, b = r(100, 999), r(10, 999)
        return (max(a, b), min(a, b)) if kind == "sub" else (a, b)
    if kind == "add_sub":
        a, b = r(10, 999), r(10, 999)
        return a, b, r(1, a + b)
    if kind == "sub_add":
        a = r(100, 999)
        return a, r(1, a), r(10, 999)
    if kind == "add_add":
        return r(10, 999), r(10, 999), r(10, 999)
    a, b = r(2, 12), r(2, 99)
    return (a, b, r(1, 999)) if kind == "mul_add" else (a, b, r(1, a * b))


def _steps(kind: str, nums: tuple[int, ...]) -> tuple[list[str], int]:
    """The worked steps (``"23 + 15 = 38"``) and the final answer."""
    lines, value = [], nums[0]
    for op_name, operand in zip(kind.split("_"), nums[1:]):
        new = {"add": value + operand, "sub": value - operand, "mul": value * operand}[op_name]
        lines.append(f"{value} {_OPS[op_name]} {operand} = {new}")
        value = new
    return lines, value


def _kinds_for(level: int) -> tuple[str, ...]:
    return {
        0: ("add", "sub", "add_sub", "sub_add", "add_add"),
        1: ("add", "sub"),
        2: ("add", "sub", "mul"),
        3: ("add_sub", "sub_add", "add_add", "mul_add", "mul_sub"),
    }[level]


def make_arithmetic(
    n: int, seed: int = DEFAULT_SEED, levels: Iterable[int] = (1, 2, 3), exclude: Iterable[str] = ()
) -> list[dict]:
    """``n`` distinct problems at the given levels; ``exclude``: expressions (``"4 * 12 + 9"``) to avoid."""
    return _make(n, seed, levels, exclude)[0]


def _make(n: int, seed: int, levels: Iterable[int], exclude: Iterable[str]) -> tuple[list[dict], set[str]]:
    levels = tuple(levels)
    if not levels or any(lv not in (0, 1, 2, 3) for lv in levels):
        raise ValueError(f"levels must be a non-empty subset of (0, 1, 2, 3), got {levels}")
    rng = random.Random(seed)
    seen, made, rows, attempts = set(exclude), set(), [], 0
    while len(rows) < n:
        attempts += 1
        if attempts > 50 * n + 1000:
            raise ValueError(f"cannot make {n} distinct problems at levels {levels}; ask for fewer")
        level = rng.choice(levels)
        kind = rng.choice(_kinds_for(level))
        nums = _numbers(kind, level, rng)
        lines, answer = _steps(kind, nums)
        expr = " ".join([str(nums[0])] + [f"{_OPS[k]} {x}" for k, x in zip(kind.split("_"), nums[1:])])
        if expr in seen:
            continue
        seen.add(expr)
        made.add(expr)
        question = rng.choice(TEMPLATES[kind]).format(
            name=rng.choice(NAMES),
            item=rng.choice(ITEMS),
            box=rng.choice(CONTAINERS),
            **dict(zip("abc", nums)),
        )
        thinking = "\n".join(lines)
        rows.append(
            {
                "messages": [
                    {"role": "user", "content": question},
                    {
                        "role": "assistant",
                        "content": f"<think>\n{thinking}\n</think>\n\n<answer>{answer}</answer>",
                    },
                ],
                "solution": str(answer),
                "level": level,
            }
        )
    return rows, made


@functools.lru_cache(maxsize=2)
def _easy_pool(seed: int) -> tuple[dict, ...]:
    return tuple(make_arithmetic(max(stop for _, stop in EASY_SPLITS.values()), seed, levels=(0,)))


def arithmetic_split(
    split: str = "train",
    *,
    seed: int = DEFAULT_SEED,
    n_train: int = SPLIT_SIZES["train"],
    n_test: int = SPLIT_SIZES["test"],
) -> list[dict]:
    """A subset; ``test`` avoids every expression that ``train`` holds, the ``easy_*`` ones each other's."""
    if split in EASY_SPLITS:
        start, stop = EASY_SPLITS[split]
        return [dict(row) for row in _easy_pool(seed)[start:stop]]
    if split not in SPLIT_SIZES:
        choices = sorted(SPLIT_SIZES) + sorted(EASY_SPLITS)
        raise ValueError(f"swiftray/arithmetic has no subset {split!r}; choose from {choices}")
    train, train_expressions = _make(n_train, seed, (1, 2, 3), ())
    if split == "train":
        return train
    return make_arithmetic(n_test, seed + 1, exclude=train_expressions)
