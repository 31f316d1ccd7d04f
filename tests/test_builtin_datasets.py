"""Built-in datasets: self-cognition placeholders and subsets; arithmetic answers re-computed."""

import re
import string

import datasets
import pytest

from swiftray.data.builtin import (
    SELF_COGNITION_HELDOUT,
    arithmetic_split,
    make_arithmetic,
    make_self_cognition,
)
from swiftray.data.builtin.self_cognition import load_pairs
from swiftray.data.loader import load_datasets

datasets.disable_progress_bars()

NAMES, AUTHORS = ["小黄", "Xiao Huang"], ["魔搭", "ModelScope"]


def _plain(text: str) -> str:
    """Lower case, no punctuation: how near-identical questions are compared."""
    drop = str.maketrans("", "", string.punctuation + "？，。！")
    return " ".join(text.lower().translate(drop).split())


# ------------------------------------------------------------------------------------- self-cognition


def test_self_cognition_has_100_plus_distinct_pairs_with_placeholders():
    pairs = load_pairs()
    assert len(pairs) >= 100
    assert len({p["query"] for p in pairs}) == len(pairs)
    assert {p["tag"] for p in pairs} == {"zh", "en"}
    assert all("{{NAME}}" in p["response"] or "{{AUTHOR}}" in p["response"] for p in pairs)


def test_placeholders_filled_per_language():
    rows = make_self_cognition(model_name=NAMES, model_author=AUTHORS)
    assert len(rows) == len(load_pairs())
    texts = [m["content"] for r in rows for m in r["messages"]]
    assert not any("{{" in t for t in texts)
    for row, pair in zip(rows, load_pairs()):
        answer = row["messages"][1]["content"]
        name, author = (NAMES[0], AUTHORS[0]) if pair["tag"] == "zh" else (NAMES[1], AUTHORS[1])
        if "{{NAME}}" in pair["response"]:
            assert name in answer
        if "{{AUTHOR}}" in pair["response"]:
            assert author in answer
    assert any("Xiao Huang" in t for t in texts) and any("魔搭" in t for t in texts)


def test_a_single_name_serves_both_languages_and_missing_name_is_an_error():
    rows = make_self_cognition(model_name=["Nova"], model_author="Acme Labs")
    answers = " ".join(r["messages"][1]["content"] for r in rows)
    assert "Nova" in answers and "Acme Labs" in answers
    with pytest.raises(ValueError, match="--model_name"):
        make_self_cognition(model_author="Acme")
    with pytest.raises(ValueError, match="no subset"):
        make_self_cognition("thinking", model_name="a", model_author="b")


@pytest.mark.parametrize(
    "subset, suffix, prefix",
    [
        ("default", "", ""),
        ("qwen3", " /no_think", "<think>\n\n</think>\n\n"),
        ("empty_think", "", "<think>\n\n</think>\n\n"),
    ],
)
def test_subsets_shape_question_and_answer(subset, suffix, prefix):
    plain = make_self_cognition(model_name="N", model_author="A")
    rows = make_self_cognition(subset, model_name="N", model_author="A")
    for row, base in zip(rows, plain):
        assert row["messages"][0]["content"] == base["messages"][0]["content"] + suffix
        assert row["messages"][1]["content"] == prefix + base["messages"][1]["content"]


def test_heldout_questions_are_not_in_training():
    assert len(SELF_COGNITION_HELDOUT) == 10
    train = {_plain(p["query"]) for p in load_pairs()}
    assert not train & {_plain(q) for q in SELF_COGNITION_HELDOUT}


def test_self_cognition_loads_by_name_with_sampling():
    ds = load_datasets(["swift/self-cognition:qwen3#30"], model_name=NAMES, model_author=AUTHORS)
    assert len(ds) == 30
    assert all(m[1]["content"].startswith("<think>\n\n</think>\n\n") for m in ds["messages"])
    both = load_datasets(["swift/self-cognition:default/empty_think"], model_name=["N"], model_author=["A"])
    assert len(both) == 2 * len(load_pairs())


# ------------------------------------------------------------------------------------- arithmetic
# An independent reading of the questions: numbers in order, each operation told by the words around it.

SUB_WORDS = ("gives", "sold", "lost")
ADD_WORDS = ("buys", "adds", "found", "had", "gets", "and")


def parse_question(question: str) -> tuple[list[int], list[str]]:
    """-> operands and operators ("+", "-", "*") in the order they apply."""
    matches = list(re.finditer(r"\d+", question))
    ops = []
    for prev, cur in zip(matches, matches[1:]):
        between = question[prev.end() : cur.start()]
        after = question[cur.end() : cur.end() + 25]
        if (" with " in between or "rows of" in between) and "in each" in after:
            ops.append("*")
        elif any(w in between for w in SUB_WORDS):
            ops.append("-")
        elif any(w in between for w in ADD_WORDS) or after.startswith(" more"):
            ops.append("+")
        else:
            raise AssertionError(f"cannot read the operation before {cur.group()} in {question!r}")
    return [int(m.group()) for m in matches], ops


def evaluate(numbers: list[int], ops: list[str]) -> int:
    value = numbers[0]
    for op, x in zip(ops, numbers[1:]):
        value = value + x if op == "+" else value - x if op == "-" else value * x
    return value


@pytest.fixture(scope="module")
def splits():
    return arithmetic_split("train"), arithmetic_split("test")


def test_sizes_levels_and_columns(splits):
    train, test = splits
    assert len(train) == 5000 and len(test) == 500
    assert {r["level"] for r in train} == {1, 2, 3}
    assert set(train[0]) == {"messages", "solution", "level"}


def test_answers_are_correct(splits):
    for row in splits[0] + splits[1]:
        question, answer = row["messages"][0]["content"], row["messages"][1]["content"]
        numbers, ops = parse_question(question)
        expected = evaluate(numbers, ops)
        assert expected >= 0
        assert row["solution"] == str(expected), question
        shape = re.fullmatch(r"<think>\n(.*)\n</think>\n\n<answer>(\d+)</answer>", answer, re.S)
        assert shape.group(2) == str(expected)
        for step in answer.split("</think>")[0].removeprefix("<think>\n").splitlines():
            a, op, b, eq, c = step.split()
            assert eq == "=" and evaluate([int(a), int(b)], [op]) == int(c), step
        assert len(ops) == (2 if row["level"] == 3 else 1)


def test_train_and_test_share_no_question_and_no_arithmetic(splits):
    train, test = splits

    def signature(row):  # the arithmetic, whatever the names and items
        numbers, ops = parse_question(row["messages"][0]["content"])
        return tuple(numbers), tuple(ops)

    train_sigs = {signature(r) for r in train}
    assert len(train_sigs) == len(train)  # no problem twice
    assert not train_sigs & {signature(r) for r in test}
    assert not {r["messages"][0]["content"] for r in train} & {r["messages"][0]["content"] for r in test}


def test_generator_is_seeded_and_levels_knob_limits_difficulty():
    assert make_arithmetic(50, seed=7) == make_arithmetic(50, seed=7)
    assert make_arithmetic(50, seed=7) != make_arithmetic(50, seed=8)
    for row in make_arithmetic(300, seed=1, levels=(1,)):
        numbers, ops = parse_question(row["messages"][0]["content"])
        assert row["level"] == 1 and len(ops) == 1 and set(ops) <= {"+", "-"} and max(numbers) < 100
    assert {r["level"] for r in make_arithmetic(100, seed=1, levels=(2, 3))} == {2, 3}
    with pytest.raises(ValueError, match="levels"):
        make_arithmetic(5, levels=(4,))


def test_arithmetic_loads_by_name():
    ds = load_datasets(["swiftray/arithmetic:test#20"], shuffle=False)
    assert len(ds) == 20 and ds.column_names == ["messages", "solution", "level"]
    assert ds["messages"] == [r["messages"] for r in arithmetic_split("test")[:20]]  # shuffle off: first rows
