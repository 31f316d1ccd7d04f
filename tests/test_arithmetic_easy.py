"""The demo's level-0 arithmetic: three disjoint splits, right answers, one-digit numbers."""

from __future__ import annotations

import re

from swiftray.data.builtin.arithmetic import EASY_SPLITS, arithmetic_split
from swiftray.data.loader import load_datasets


def worked_answer(question_steps: str) -> int:
    """Recompute the answer from the worked steps' operands only, independently of the generator."""
    value = None
    for line in question_steps.strip().splitlines():
        a, op, b, _, _ = line.split()
        a = value if value is not None else int(a)
        value = a + int(b) if op == "+" else a - int(b)
    return value


def test_easy_splits_are_disjoint_correct_and_small():
    splits = {name: arithmetic_split(name) for name in EASY_SPLITS}
    assert {k: len(v) for k, v in splits.items()} == {k: b - a for k, (a, b) in EASY_SPLITS.items()}
    keys = {name: {r["messages"][1]["content"].split("</think>")[0] for r in rows} for name, rows in splits.items()}
    assert not keys["easy_train"] & keys["easy_test"]
    assert not keys["easy_train"] & keys["easy_val"] and not keys["easy_val"] & keys["easy_test"]
    for rows in splits.values():
        for row in rows:
            question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
            numbers = [int(n) for n in re.findall(r"\d+", question)]
            assert numbers and all(1 <= n <= 9 for n in numbers)
            steps = answer.split("<think>\n")[1].split("\n</think>")[0]
            assert worked_answer(steps) == int(row["solution"]) >= 0
            assert answer.endswith(f"<answer>{row['solution']}</answer>")


def test_easy_splits_load_by_name_and_are_deterministic():
    first = load_datasets(["swiftray/arithmetic:easy_test#20"], shuffle=False)
    again = load_datasets(["swiftray/arithmetic:easy_test#20"], shuffle=False)
    assert first["solution"] == again["solution"] and len(first) == 20
