"""``swiftray/arithmetic-pairs``: preference pairs on the ``swiftray/arithmetic`` problems, for DPO, KTO,
ORPO, SimPO, CPO and reward models, offline.

Each subset is built from the same-named subset of ``swiftray/arithmetic`` (``easy_train``, ``easy_val``,
``easy_test``, ``train``, ``test``), so the pair splits are as disjoint as the problem splits are (no
problem shared), and a pair set's held-out problems are the task's held-out problems too. A row is
ms-swift's pair format: ``messages`` with the right answer and its working (the SFT answer, unchanged),
``rejected_response`` a plausible wrong one in the same style, and ``solution``, ``level``, ``mistake``.

Mistakes, chosen per problem from a generator seeded by the problem itself (so a subset is the same
whatever else is asked for):

- ``off_by_one``: the last step's result is one off, and so is the answer;
- ``wrong_operation``: one step uses + for - (or the reverse, or + for *), later steps follow from it;
- ``slip``: an intermediate result is one off (or ten off past 10), later steps follow from it;
- ``skipped_step``: the working stops one step early and answers the intermediate result.

A wrong answer is never negative and never equals the right one. The ``*_kto`` subsets (``easy_train_kto``
...) are the KTO view: every pair becomes two rows, ``label`` true with the right answer and false with
the wrong one.
"""

from __future__ import annotations

import random

from swiftray.data.builtin.arithmetic import EASY_SPLITS, SPLIT_SIZES, arithmetic_split

PAIR_SUBSETS = tuple(SPLIT_SIZES) + tuple(EASY_SPLITS)
MISTAKES = ("off_by_one", "wrong_operation", "slip", "skipped_step")
_APPLY = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
_SWAP = {"+": "-", "-": "+", "*": "+"}

Step = tuple[int, str, int]  # (left operand, operator, right operand)


def _parse_steps(answer: str) -> list[Step]:
    """The worked steps of an arithmetic answer, ``<think>\\n5 + 3 = 8\\n8 - 2 = 6\\n</think>...``."""
    working = answer.split("</think>")[0].removeprefix("<think>\n").strip()
    steps = []
    for line in working.splitlines():
        left, op, right, _eq, _result = line.split()
        steps.append((int(left), op, int(right)))
    return steps


def _work(first: int, ops: list[tuple[str, int]], slips: dict[int, int] | None = None,
          propagate: bool = True) -> tuple[list[str], int]:
    """Carry a value through ``ops``; ``slips[i]`` is added to step i's shown result (a miscalculation),
    which the next step starts from (propagate) or not (the true result: a broken chain)."""
    lines, value = [], first
    for i, (op, operand) in enumerate(ops):
        result = _APPLY[op](value, operand)
        shown = result + (slips or {}).get(i, 0)
        lines.append(f"{value} {op} {operand} = {shown}")
        value = shown if propagate else result
    return lines, value


def render_answer(lines: list[str], answer: int) -> str:
    """A worked answer in the SFT answers' style: the working in a think block, then the answer."""
    return "<think>\n" + "\n".join(lines) + f"\n</think>\n\n<answer>{answer}</answer>"


def _wrong_working(steps: list[Step], mistake: str, rng: random.Random) -> tuple[list[str], int] | None:
    """The working and answer of ``mistake`` on these steps, or None when it does not apply."""
    first, ops = steps[0][0], [(op, b) for _a, op, b in steps]
    last = len(ops) - 1
    if mistake == "off_by_one":
        return _work(first, ops, {last: rng.choice((-1, 1))})
    if mistake == "wrong_operation":
        i = rng.randrange(len(ops))
        changed = list(ops)
        changed[i] = (_SWAP[ops[i][0]], ops[i][1])
        return _work(first, changed)
    if mistake == "slip" and last > 0:
        i = rng.randrange(last)  # an intermediate step; later steps stay correct from the wrong value
        _lines, value = _work(first, ops[: i + 1])
        size = 10 if value >= 10 and rng.random() < 0.5 else 1
        return _work(first, ops, {i: rng.choice((-size, size))})
    if mistake == "skipped_step" and last > 0:
        return _work(first, ops[:last])
    return None


def make_rejected(row: dict, seed: int) -> tuple[str, str]:
    """(rejected answer in the SFT answers' style, mistake name) for one arithmetic row."""
    answer = row["messages"][-1]["content"]
    steps = _parse_steps(answer)
    right = int(row["solution"])
    rng = random.Random(f"{seed}:{row['messages'][0]['content']}")  # str seeds hash with sha512: stable
    for mistake in rng.sample(MISTAKES, len(MISTAKES)):
        made = _wrong_working(steps, mistake, rng)
        if made is None:
            continue
        lines, wrong = made
        if wrong != right and wrong >= 0 and all(int(x.split()[-1]) >= 0 for x in lines):
            return render_answer(lines, wrong), mistake
    # off_by_one upwards always qualifies; reached only if every random draw went below zero
    lines, wrong = _work(steps[0][0], [(op, b) for _a, op, b in steps], {len(steps) - 1: 1})
    return render_answer(lines, wrong), "off_by_one"


def arithmetic_pairs_split(split: str = "train", *, seed: int = 0) -> list[dict]:
    """One subset of pairs (``PAIR_SUBSETS``), or its KTO view with the suffix ``_kto``."""
    kto = split.endswith("_kto")
    base = split.removesuffix("_kto")
    if base not in PAIR_SUBSETS:
        choices = [*PAIR_SUBSETS, *(f"{s}_kto" for s in PAIR_SUBSETS)]
        raise ValueError(f"swiftray/arithmetic-pairs has no subset {split!r}; choose from {choices}")
    rows = []
    for problem in arithmetic_split(base):
        rejected, mistake = make_rejected(problem, seed)
        common = {"solution": problem["solution"], "level": problem["level"], "mistake": mistake}
        if not kto:
            rows.append({"messages": problem["messages"], "rejected_response": rejected, **common})
            continue
        question = problem["messages"][:-1]
        rows.append({"messages": problem["messages"], "label": True, **common})
        rows.append({"messages": question + [{"role": "assistant", "content": rejected}], "label": False, **common})
    return rows
