"""normalize_row: every accepted row format gives the same messages; bad rows name line and field."""

import json
import pickle

import pytest

from swiftray.data.formats import DatasetFormatError, normalize_row

SYSTEM = "You are a careful assistant."
TURNS = [("What is 2 + 3?", "2 + 3 = 5."), ("And times 4?", "5 * 4 = 20.")]
EXPECTED = [
    {"role": "system", "content": SYSTEM},
    {"role": "user", "content": TURNS[0][0]},
    {"role": "assistant", "content": TURNS[0][1]},
    {"role": "user", "content": TURNS[1][0]},
    {"role": "assistant", "content": TURNS[1][1]},
]


def same_conversation_rows() -> dict[str, dict]:
    """One conversation written in every accepted row format."""
    sharegpt = [{"from": "system", "value": SYSTEM}]
    for q, r in TURNS:
        sharegpt += [{"from": "human", "value": q}, {"from": "gpt", "value": r}]
    return {
        "messages": {"messages": EXPECTED},
        "conversations": {"conversations": sharegpt},
        "conversation": {"conversation": sharegpt},
        "sharegpt_user_assistant": {
            "conversations": [
                {"from": "system", "value": SYSTEM},
                {"from": "user", "value": TURNS[0][0]},
                {"from": "assistant", "value": TURNS[0][1]},
                {"from": "user", "value": TURNS[1][0]},
                {"from": "assistant", "value": TURNS[1][1]},
            ]
        },
        "query_response": {
            "system": SYSTEM,
            "history": [list(TURNS[0])],
            "query": TURNS[1][0],
            "response": TURNS[1][1],
        },
        "prompt_output": {
            "system": SYSTEM,
            "history": [list(TURNS[0])],
            "prompt": TURNS[1][0],
            "output": TURNS[1][1],
        },
        "question_answer": {
            "system": SYSTEM,
            "history": [list(TURNS[0])],
            "question": TURNS[1][0],
            "answer": TURNS[1][1],
        },
        "problem_answer": {
            "system": SYSTEM,
            "history": json.dumps([list(TURNS[0])]),
            "problem": TURNS[1][0],
            "answer": TURNS[1][1],
        },
    }


@pytest.mark.parametrize("fmt", list(same_conversation_rows()))
def test_every_format_gives_the_same_messages(fmt):
    row = same_conversation_rows()[fmt]
    row["solution"] = "20"
    out = normalize_row(row)
    assert out["messages"] == EXPECTED
    assert out["solution"] == "20"
    assert set(out) == {"messages", "solution"}  # format columns consumed, extras kept


def test_alpaca_joins_instruction_and_input():
    out = normalize_row({"instruction": "Translate to French.", "input": "Good morning", "output": "Bonjour"})
    assert out["messages"] == [
        {"role": "user", "content": "Translate to French.\nGood morning"},
        {"role": "assistant", "content": "Bonjour"},
    ]
    empty_input = normalize_row({"instruction": "Say hi.", "input": "", "output": "hi"})
    assert empty_input["messages"][0] == {"role": "user", "content": "Say hi."}


def test_extra_columns_are_kept_unchanged():
    row = {"query": "q", "response": "good", "rejected_response": "bad", "solution": "42", "meta": {"k": [1]}}
    out = normalize_row(row)
    assert out["rejected_response"] == "bad" and out["solution"] == "42" and out["meta"] == {"k": [1]}


def test_empty_system_is_dropped_and_numbers_become_strings():
    out = normalize_row({"system": "  ", "question": 7, "answer": 38})
    assert out["messages"] == [{"role": "user", "content": "7"}, {"role": "assistant", "content": "38"}]


def test_tool_roles_and_tool_calls_kept_as_string():
    calls = [{"type": "function", "function": {"name": "add", "arguments": '{"a": 1}'}}]
    out = normalize_row(
        {
            "messages": [
                {"role": "user", "content": "add 1"},
                {"role": "assistant", "content": None, "tool_calls": calls},
                {"role": "tool", "content": "1"},
                {"role": "assistant", "content": "It is 1."},
            ]
        }
    )
    assert [m["role"] for m in out["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(out["messages"][1]["content"]) == calls
    sharegpt = normalize_row(
        {
            "conversations": [
                {"from": "human", "value": "weather?"},
                {"from": "function_call", "value": {"name": "weather"}},
                {"from": "observation", "value": "sunny"},
                {"from": "gpt", "value": "Sunny."},
            ]
        }
    )
    assert [m["role"] for m in sharegpt["messages"]] == ["user", "assistant", "tool", "assistant"]
    assert json.loads(sharegpt["messages"][1]["content"]) == {"name": "weather"}
    assert all(isinstance(m["content"], str) for m in sharegpt["messages"])


def test_messages_as_json_string_are_decoded():
    out = normalize_row({"messages": json.dumps(EXPECTED)})
    assert out["messages"] == EXPECTED


def test_prompt_only_row_needs_allow_no_response():
    row = {"messages": [{"role": "user", "content": "2+2?"}], "solution": "4"}
    assert normalize_row(row, allow_no_response=True)["messages"] == row["messages"]
    with pytest.raises(DatasetFormatError) as err:
        normalize_row(row, source="grpo.jsonl", line=4)
    msg = str(err.value)
    assert "grpo.jsonl line 4" in msg and "'messages'" in msg and "no assistant turn" in msg
    assert err.value.reason == "no assistant turn"
    with pytest.raises(DatasetFormatError, match=r"row index 3, field 'response': no assistant turn"):
        normalize_row({"query": "q"}, source="x.csv", index=3)


@pytest.mark.parametrize(
    "row, field, words, reason",
    [
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}]},
            "messages[1].role",
            "unknown role 'bot'",
            "unknown role",
        ),
        (
            {"conversations": [{"from": "human", "value": "a"}, {"from": "robot", "value": "b"}]},
            "conversations[1].from",
            "unknown role 'robot'",
            "unknown role",
        ),
        (
            {"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "b"}]},
            "messages[0].content",
            "empty content in the user turn",
            "empty content",
        ),
        (
            {"messages": [{"role": "user", "content": "a"}, {"role": "assistant", "content": ""}]},
            "messages[1].content",
            "empty content in the assistant turn",
            "empty content",
        ),
        (
            {"conversations": [{"from": "human", "value": None}, {"from": "gpt", "value": "b"}]},
            "conversations[0].value",
            "empty content",
            "empty content",
        ),
        ({"query": "", "response": "r"}, "query", "empty content", "empty content"),
        ({"query": "q", "response": "   "}, "response", "empty content", "empty content"),
        (
            {"query": "q", "history": [["only one"]], "response": "r"},
            "history[0]",
            "[query, response] pair",
            "bad value",
        ),
        ({"text": "hello", "label": 1}, "<columns>", "['text', 'label']", "unknown format"),
    ],
)
def test_bad_rows_name_file_line_and_field(row, field, words, reason):
    with pytest.raises(DatasetFormatError) as err:
        normalize_row(row, source="data/train.jsonl", line=12)
    msg = str(err.value)
    assert "data/train.jsonl line 12" in msg
    assert f"field '{field}'" in msg
    assert words in msg
    assert err.value.reason == reason


def test_unknown_format_lists_accepted_columns():
    with pytest.raises(DatasetFormatError) as err:
        normalize_row({"text": "x"}, source="d.parquet", index=5)
    msg = str(err.value)
    assert "d.parquet row index 5" in msg
    for name in (
        "messages",
        "conversations",
        "query",
        "prompt",
        "instruction",
        "question",
        "problem",
        "response",
        "output",
        "answer",
    ):
        assert name in msg


def test_error_is_a_value_error_and_survives_pickling():
    err = DatasetFormatError("f.jsonl line 2, field 'x': bad", "empty content")
    assert isinstance(err, ValueError)
    back = pickle.loads(pickle.dumps(err))
    assert str(back) == str(err) and back.reason == "empty content"
