"""scripts/preference_learning.py's data plumbing: the control's coin flips and the on-policy pairs
(the runs themselves are too long for the suite; docs/preference_runs.md has their figures)."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))

from preference_learning import right_against_wrong, swapped_at_random  # noqa: E402


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
