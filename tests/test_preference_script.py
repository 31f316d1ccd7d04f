"""scripts/preference_data.py, the preference runs' data: the control's coin flips, the on-policy pairs and the
line-check pairs (the runs themselves are too long for the suite; docs/preference_runs.md has their figures)."""

from __future__ import annotations

import random
import re
import sys
from pathlib import Path

import pytest

from swiftray.data.builtin.arithmetic import arithmetic_split

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from preference_data import (  # noqa: E402
    ARITH_BREAKS,
    BREAKS,
    broken_workings,
    right_against_wrong,
    sampled_break_pairs,
    swapped_at_random,
)


def test_own_samples_pair_each_distinct_right_answer_with_a_different_wrong_one() -> None:
    samples = [("a=3", 1.0), ("a=4", 0.0), ("a=3", 1.0), ("a=5", 0.0), ("a=4", 0.0), ("b=3", 1.0), ("b=3", 1.0)]
    assert right_against_wrong(samples) == [("a=3", "a=4"), ("b=3", "a=5")]
    assert right_against_wrong([("a=3", 1.0), ("x", 1.0)]) == []  # no wrong answer: no pair
    assert right_against_wrong([("a=4", 0.0), ("a=5", 0.5)]) == []  # partial credit is not right


def test_the_control_swaps_a_seeded_half_of_the_pairs_and_keeps_the_rest() -> None:
    rows = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": f"good{i}"}],
             "rejected_response": f"bad{i}"} for i in range(400)]
    out = swapped_at_random(rows, seed=3)
    assert out == swapped_at_random(rows, seed=3) and out != swapped_at_random(rows, seed=4)
    swapped = [r["messages"][-1]["content"].startswith("bad") for r in out]
    assert 160 < sum(swapped) < 240  # a fair coin per pair
    for row, new in zip(rows, out):
        assert new["messages"][0] == row["messages"][0]
        assert {new["messages"][-1]["content"], new["rejected_response"]} == {
            row["messages"][-1]["content"], row["rejected_response"]}


def passes_every_visible_check(question: str, answer: str) -> bool:
    """What a reader can check without solving the problem: the question's numbers copied in order, each
    line's arithmetic, each line starting from the last result, and the answer equal to the last result."""
    lines = answer.split("</think>")[0].removeprefix("<think>\n").strip().splitlines()
    parsed = [line.split() for line in lines]
    copied = [int(parsed[0][0])] + [int(p[2]) for p in parsed]
    ops = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
    sums = all(ops[op](int(a), int(b)) == int(c) for a, op, b, _eq, c in parsed)
    chain = all(int(parsed[i][0]) == int(parsed[i - 1][4]) for i in range(1, len(parsed)))
    final = int(re.search(r"<answer>(-?\d+)</answer>", answer).group(1)) == int(parsed[-1][4])
    return copied == [int(n) for n in re.findall(r"\d+", question)] and sums and chain and final


@pytest.mark.parametrize("breaks", [BREAKS, ARITH_BREAKS])
def test_line_check_pairs_break_exactly_what_a_reader_can_check(breaks: tuple[str, ...]) -> None:
    rng = random.Random(0)
    kinds = 0
    for row in arithmetic_split("easy_train")[:200]:
        question = row["messages"][0]["content"]
        right, wrong = broken_workings(row, rng, 12, breaks)
        assert right == row["messages"][-1]["content"]  # the chosen side is the SFT answer itself
        assert passes_every_visible_check(question, right)
        assert wrong and len(set(wrong)) == len(wrong) and right not in wrong
        for text in wrong:
            assert not passes_every_visible_check(question, text), (question, text)
            assert not re.search(r"-\d", text)  # no negative number anywhere
        # some keep the right final answer: only the working shows the break
        kinds += sum(text.endswith(right[right.index("<answer>"):]) for text in wrong)
    assert kinds > 200


def test_sampled_break_pairs_draw_afresh_and_each_breaks_a_checkable_thing(tmp_path: Path) -> None:
    """rm_slips' data: n pairs drawn with replacement over the training problems, every rejected side failing
    a visible check, mostly by a line's result (the break GRPO learnt to exploit), seeded, and the control
    the same pairs with a seeded half swapped."""
    import json

    path = Path(sampled_break_pairs(tmp_path, seed=5, shuffled=False, n=600))
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 600
    again = tmp_path / "again"
    again.mkdir()
    assert path.read_text() == Path(sampled_break_pairs(again, seed=5, shuffled=False, n=600)).read_text()  # seeded
    questions = [row["messages"][0]["content"] for row in rows]
    assert 300 < len(set(questions)) < 600  # drawn with replacement from 1,200 problems
    slipped_lines = 0
    for row, question in zip(rows, questions):
        right, wrong = row["messages"][-1]["content"], row["rejected_response"]
        assert passes_every_visible_check(question, right) and not passes_every_visible_check(question, wrong)
        slipped_lines += right.split("</think>")[0] != wrong.split("</think>")[0]
    assert slipped_lines > 0.6 * len(rows)  # four in five of ARITH_BREAKS change a line
    control = [json.loads(line) for line in Path(sampled_break_pairs(tmp_path, 5, True, n=600)).read_text().splitlines()]
    flipped = sum(c["messages"][-1]["content"] != r["messages"][-1]["content"] for c, r in zip(control, rows))
    assert 220 < flipped < 380
