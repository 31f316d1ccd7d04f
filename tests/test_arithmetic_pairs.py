"""swiftray/arithmetic-pairs: disjoint splits, seeded, chosen right and rejected wrong by the accuracy reward,
each mistake what its name says, and the KTO view."""

import hashlib
import json
import os
import re
import subprocess
import sys
from collections import Counter

import datasets
import pytest

from swiftray.data.builtin.arithmetic import EASY_SPLITS
from swiftray.data.builtin.arithmetic_pairs import MISTAKES, arithmetic_pairs_split
from swiftray.data.loader import load_datasets
from swiftray.data.preference import normalize_kto_row, normalize_pair_row
from swiftray.rewards.builtin import Format, MathAccuracy

datasets.disable_progress_bars()
ANSWER = re.compile(r"<think>\n(.*)\n</think>\n\n<answer>(\d+)</answer>", re.S)
OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}


@pytest.fixture(scope="module")
def subsets() -> dict[str, list[dict]]:
    return {name: arithmetic_pairs_split(name) for name in (*EASY_SPLITS, "train", "test")}


def steps(answer: str) -> tuple[list[tuple[int, str, int, int]], int]:
    """(a, op, b, written result) per working line, and the final answer."""
    shape = ANSWER.fullmatch(answer)
    assert shape, answer
    lines = [line.split() for line in shape.group(1).splitlines()]
    return [(int(a), op, int(b), int(c)) for a, op, b, _eq, c in lines], int(shape.group(2))


def question(row: dict) -> str:
    return row["messages"][0]["content"]


def test_splits_share_no_problem(subsets):
    for group in (list(EASY_SPLITS), ["train", "test"]):
        seen: dict[str, str] = {}
        for name in group:
            for row in subsets[name]:
                q = question(row)
                assert q not in seen, f"{q!r} in both {seen.get(q)} and {name}"
                seen[q] = name
    for name, rows in subsets.items():
        assert len({question(r) for r in rows}) == len(rows), name  # no problem twice within a split


def test_seeded_and_the_same_in_a_fresh_process(subsets):
    assert arithmetic_pairs_split("easy_val") == subsets["easy_val"]
    assert arithmetic_pairs_split("easy_val", seed=1) != subsets["easy_val"]
    code = ("import hashlib, json; from swiftray.data.builtin.arithmetic_pairs import arithmetic_pairs_split as s; "
            "print(hashlib.sha256(json.dumps(s('easy_val'), sort_keys=True).encode()).hexdigest())")
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    fresh = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    here = hashlib.sha256(json.dumps(subsets["easy_val"], sort_keys=True).encode()).hexdigest()
    assert fresh.stdout.strip() == here


@pytest.mark.parametrize("name", ["easy_train", "easy_val", "easy_test", "test"])
def test_chosen_right_and_rejected_wrong_by_the_accuracy_reward(subsets, name):
    rows = subsets[name]
    accuracy, fmt = MathAccuracy(use_timeout=False), Format()
    solutions = [r["solution"] for r in rows]
    chosen = [r["messages"][-1]["content"] for r in rows]
    rejected = [r["rejected_response"] for r in rows]
    assert accuracy(chosen, solution=solutions) == [1.0] * len(rows)
    assert accuracy(rejected, solution=solutions) == [0.0] * len(rows)
    assert fmt(rejected) == [1.0] * len(rows)  # the same answer format: only the arithmetic is wrong


def test_each_mistake_is_what_its_name_says(subsets):
    counts = Counter()
    for row in subsets["easy_train"] + subsets["test"]:
        right_steps, right = steps(row["messages"][-1]["content"])
        wrong_steps, wrong = steps(row["rejected_response"])
        assert wrong != right and wrong >= 0 and wrong == wrong_steps[-1][3]
        assert all(r >= 0 for *_, r in wrong_steps)
        miscalculated = [i for i, (a, op, b, r) in enumerate(wrong_steps) if OPS[op](a, b) != r]
        for i in range(1, len(wrong_steps)):  # each step starts from the previous written result
            assert wrong_steps[i][0] == wrong_steps[i - 1][3]
        mistake = row["mistake"]
        counts[mistake] += 1
        if mistake == "off_by_one":
            assert miscalculated == [len(wrong_steps) - 1] and abs(wrong - right) == 1
        elif mistake == "slip":
            assert len(miscalculated) == 1 and miscalculated[0] < len(wrong_steps) - 1
            a, op, b, r = wrong_steps[miscalculated[0]]
            assert abs(OPS[op](a, b) - r) in (1, 10)
        elif mistake == "wrong_operation":
            assert not miscalculated and len(wrong_steps) == len(right_steps)
            assert sum(w[1] != c[1] for w, c in zip(wrong_steps, right_steps)) == 1
        else:
            assert mistake == "skipped_step" and not miscalculated
            assert wrong_steps == right_steps[:-1]
    assert set(counts) == set(MISTAKES)


def test_kto_view_labels_right_true_and_wrong_false(subsets):
    rows = arithmetic_pairs_split("easy_val_kto")
    pairs = subsets["easy_val"]
    assert len(rows) == 2 * len(pairs)
    assert Counter(r["label"] for r in rows) == {True: len(pairs), False: len(pairs)}
    for pair, good, bad in zip(pairs, rows[0::2], rows[1::2]):
        assert good["label"] is True and good["messages"] == pair["messages"]
        assert bad["label"] is False and bad["messages"][:-1] == pair["messages"][:-1]
        assert bad["messages"][-1] == {"role": "assistant", "content": pair["rejected_response"]}
    with pytest.raises(ValueError, match="no subset"):
        arithmetic_pairs_split("val")


def test_loads_by_name_in_both_views():
    pairs = load_datasets(["swiftray/arithmetic-pairs:easy_test#10"], shuffle=False, normalize=normalize_pair_row)
    assert len(pairs) == 10 and {"messages", "rejected_messages", "solution"} <= set(pairs.column_names)
    assert pairs[0]["rejected_messages"][-1]["content"] == arithmetic_pairs_split("easy_test")[0]["rejected_response"]
    kto = load_datasets(["swiftray/arithmetic-pairs:easy_test_kto#10"], shuffle=False, normalize=normalize_kto_row)
    assert kto["label"][:4] == [True, False, True, False]
