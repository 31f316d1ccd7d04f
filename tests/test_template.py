"""Chat template rendering and Template's ids / loss labels, against hand-written expectations.

Expected ids are built by tokenising hand-written pieces of text one by one
(`expect`), never by calling Template: a piece is (text, gets_loss).
"""

from __future__ import annotations

import pytest

from swiftray.data.template import IGNORE_INDEX, SampleTooLongError, Template, parse_loss_scale

S, E = "<|im_start|>", "<|im_end|>"
EMPTY_THINK = "<think>\n\n</think>\n\n"

MULTI_TURN = [
    {"role": "user", "content": "Hi there"},
    {"role": "assistant", "content": "Hello! How can I help?"},
    {"role": "user", "content": "What is 12 + 7?"},
    {"role": "assistant", "content": "12 + 7 = 19."},
]


def ids_of(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def expect(tok, *pieces: tuple[str, bool]) -> dict[str, list[int]]:
    input_ids, labels = [], []
    for text, trained in pieces:
        piece = ids_of(tok, text)
        input_ids += piece
        labels += piece if trained else [IGNORE_INDEX] * len(piece)
    return {"input_ids": input_ids, "labels": labels}


def check(tok, template: Template, messages, *pieces, **kwargs):
    """Template.encode equals the pieces, and its ids equal those of the whole rendered conversation."""
    got = template.encode(messages, **kwargs)
    want = expect(tok, *pieces)
    assert tok.convert_ids_to_tokens(got["input_ids"]) == tok.convert_ids_to_tokens(want["input_ids"])
    assert got["labels"] == want["labels"]
    whole = "".join(text for text, _ in pieces)
    assert got["input_ids"] == ids_of(tok, whole)
    return got


# ------------------------------------------------------------------ the chat template itself


def test_chat_template_renders_qwen3_format(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "<think>\nold thought\n</think>\n\nHello"},
        {"role": "user", "content": "2+2? /no_think"},
        {"role": "assistant", "content": "4", "reasoning_content": "two plus two"},
    ]
    # The think block before the last user query is dropped; the last turn keeps its reasoning.
    assert tok.apply_chat_template(messages, tokenize=False) == (
        f"{S}system\nBe brief.{E}\n{S}user\nHi{E}\n{S}assistant\nHello{E}\n"
        f"{S}user\n2+2? /no_think{E}\n{S}assistant\n<think>\ntwo plus two\n</think>\n\n4{E}\n"
    )
    prompt = messages[:4]
    head = f"{S}system\nBe brief.{E}\n{S}user\nHi{E}\n{S}assistant\nHello{E}\n{S}user\n2+2? /no_think{E}\n"
    assert (
        tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        == head + f"{S}assistant\n"
    )
    assert (
        tok.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True, enable_thinking=False)
        == head + f"{S}assistant\n{EMPTY_THINK}"
    )


def test_chat_template_renders_tools_like_qwen3(tiny_tokenizer):
    tool = {"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}
    messages = [
        {"role": "user", "content": "Add 2 and 3."},
        {
            "role": "assistant",
            "content": "",
            "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2}}}],
        },
        {"role": "tool", "content": "5"},
        {"role": "tool", "content": "ok"},
        {"role": "assistant", "content": "It is 5."},
    ]
    text = tiny_tokenizer.apply_chat_template(messages, tools=[tool], tokenize=False)
    assert text.startswith(
        f"{S}system\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "add", "parameters": {"type": "object"}}}\n</tools>\n\n'
    )
    assert text.endswith(
        f"</tool_call>{E}\n{S}user\nAdd 2 and 3.{E}\n"
        f'{S}assistant\n<tool_call>\n{{"name": "add", "arguments": {{"a": 2}}}}\n</tool_call>{E}\n'
        f"{S}user\n<tool_response>\n5\n</tool_response>\n<tool_response>\nok\n</tool_response>{E}\n"
        f"{S}assistant\n{EMPTY_THINK}It is 5.{E}\n"
    )


# ------------------------------------------------------------------ loss scales


def test_multi_turn_default_trains_every_assistant_turn_and_its_end(tiny_tokenizer):
    tok = tiny_tokenizer
    check(
        tok,
        Template(tok),
        MULTI_TURN,
        (f"{S}user\nHi there{E}\n{S}assistant\n", False),
        (f"Hello! How can I help?{E}", True),
        (f"\n{S}user\nWhat is 12 + 7?{E}\n{S}assistant\n", False),
        (f"{EMPTY_THINK}12 + 7 = 19.{E}", True),
        ("\n", False),
    )


def test_last_round_trains_only_the_last_answer(tiny_tokenizer):
    tok = tiny_tokenizer
    check(
        tok,
        Template(tok, loss_scale="last_round"),
        MULTI_TURN,
        (
            f"{S}user\nHi there{E}\n{S}assistant\nHello! How can I help?{E}\n{S}user\nWhat is 12 + 7?{E}\n",
            False,
        ),
        (f"{S}assistant\n", False),
        (f"{EMPTY_THINK}12 + 7 = 19.{E}", True),
        ("\n", False),
    )


def test_all_trains_every_token(tiny_tokenizer):
    tok = tiny_tokenizer
    got = Template(tok, loss_scale="all").encode(MULTI_TURN)
    assert got["labels"] == got["input_ids"]
    assert got["input_ids"] == ids_of(tok, tok.apply_chat_template(MULTI_TURN, tokenize=False))


def test_ignore_empty_think_drops_loss_on_the_empty_block_only(tiny_tokenizer):
    tok = tiny_tokenizer
    check(
        tok,
        Template(tok, loss_scale="ignore_empty_think"),
        MULTI_TURN,
        (f"{S}user\nHi there{E}\n{S}assistant\n", False),
        (f"Hello! How can I help?{E}", True),
        (f"\n{S}user\nWhat is 12 + 7?{E}\n{S}assistant\n", False),
        (EMPTY_THINK, False),
        (f"12 + 7 = 19.{E}", True),
        ("\n", False),
    )
    # A think block with content keeps its loss.
    thought = MULTI_TURN[:3] + [{"role": "assistant", "content": "<think>\n12 plus 7\n</think>\n\n19."}]
    check(
        tok,
        Template(tok, loss_scale="ignore_empty_think"),
        thought,
        (f"{S}user\nHi there{E}\n{S}assistant\n", False),
        (f"Hello! How can I help?{E}", True),
        (f"\n{S}user\nWhat is 12 + 7?{E}\n{S}assistant\n", False),
        (f"<think>\n12 plus 7\n</think>\n\n19.{E}", True),
        ("\n", False),
    )


def test_last_round_plus_ignore_empty_think(tiny_tokenizer):
    tok = tiny_tokenizer
    for name in ["last_round+ignore_empty_think", "last_round_with_ignore_empty_think"]:
        check(
            tok,
            Template(tok, loss_scale=name),
            MULTI_TURN,
            (
                f"{S}user\nHi there{E}\n{S}assistant\nHello! How can I help?{E}\n{S}user\nWhat is 12 + 7?{E}\n",
                False,
            ),
            (f"{S}assistant\n{EMPTY_THINK}", False),
            (f"12 + 7 = 19.{E}", True),
            ("\n", False),
        )


def test_think_content_is_trained_and_dropped_from_history(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [
        {"role": "user", "content": "Hi there"},
        {"role": "assistant", "content": "<think>\ngreet back\n</think>\n\nHello!"},
        {"role": "user", "content": "What is 12 + 7?"},
        {"role": "assistant", "content": "19.", "reasoning_content": "12 + 7: 2 + 7 = 9, carry 1."},
    ]
    check(
        tok,
        Template(tok),
        messages,
        (f"{S}user\nHi there{E}\n{S}assistant\n", False),
        (f"Hello!{E}", True),
        (f"\n{S}user\nWhat is 12 + 7?{E}\n{S}assistant\n", False),
        (f"<think>\n12 + 7: 2 + 7 = 9, carry 1.\n</think>\n\n19.{E}", True),
        ("\n", False),
    )


def test_system_from_row_wins_over_default_system(tiny_tokenizer):
    tok = tiny_tokenizer
    template = Template(tok, default_system="You are a helpful assistant.")
    one_turn = MULTI_TURN[2:]
    tail = [
        (f"{S}user\nWhat is 12 + 7?{E}\n{S}assistant\n", False),
        (f"{EMPTY_THINK}12 + 7 = 19.{E}", True),
        ("\n", False),
    ]
    check(tok, template, one_turn, (f"{S}system\nYou are a helpful assistant.{E}\n", False), *tail)
    with_system = [{"role": "system", "content": "You are a math tutor."}] + one_turn
    check(tok, template, with_system, (f"{S}system\nYou are a math tutor.{E}\n", False), *tail)
    check(tok, Template(tok), one_turn, *tail)  # no default: no system turn


def test_message_loss_field_overrides_the_strategy(tiny_tokenizer):
    tok = tiny_tokenizer
    messages = [dict(MULTI_TURN[0]), {**MULTI_TURN[1], "loss": False}, *MULTI_TURN[2:]]
    check(
        tok,
        Template(tok),
        messages,
        (
            f"{S}user\nHi there{E}\n{S}assistant\nHello! How can I help?{E}\n{S}user\nWhat is 12 + 7?{E}\n",
            False,
        ),
        (f"{S}assistant\n", False),
        (f"{EMPTY_THINK}12 + 7 = 19.{E}", True),
        ("\n", False),
    )
    assert "loss" not in MULTI_TURN[1]


def test_tool_turns_count_as_queries_for_last_round(tiny_tokenizer):
    tok = tiny_tokenizer
    call = '<tool_call>\n{"name": "add", "arguments": {"a": 12, "b": 7}}\n</tool_call>'
    messages = [
        {"role": "user", "content": "What is 12 + 7?"},
        {"role": "assistant", "content": call},
        {"role": "tool", "content": "19"},
        {"role": "assistant", "content": "It is 19."},
    ]
    prefix = f"{S}user\nWhat is 12 + 7?{E}\n{S}assistant\n"
    tool_turn = f"\n{S}user\n<tool_response>\n19\n</tool_response>{E}\n{S}assistant\n"
    for loss_scale, first_trained in [("default", True), ("last_round", False)]:
        check(
            tok,
            Template(tok, loss_scale=loss_scale),
            messages,
            (prefix, False),
            (f"{call}{E}", first_trained),
            (tool_turn, False),
            (f"{EMPTY_THINK}It is 19.{E}", True),
            ("\n", False),
        )


# ------------------------------------------------------------------ truncation


@pytest.mark.parametrize("strategy", ["left", "right", "delete"])
def test_truncation(tiny_tokenizer, strategy):
    tok = tiny_tokenizer
    full = Template(tok).encode(MULTI_TURN)
    n = len(full["input_ids"])
    assert Template(tok, max_length=n, truncation_strategy=strategy).encode(MULTI_TURN) == full
    template = Template(tok, max_length=20, truncation_strategy=strategy)
    if strategy == "delete":
        with pytest.raises(SampleTooLongError, match=f"{n} tokens"):
            template.encode(MULTI_TURN)
        return
    got = template.encode(MULTI_TURN)
    keep = slice(n - 20, n) if strategy == "left" else slice(0, 20)
    assert got == {"input_ids": full["input_ids"][keep], "labels": full["labels"][keep]}


# ------------------------------------------------------------------ prompts for generation


def test_encode_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    template = Template(tok, default_system="Be brief.")
    head = f"{S}system\nBe brief.{E}\n{S}user\nHi there /no_think{E}\n{S}assistant\n"
    row = [{"role": "user", "content": "Hi there /no_think"}, {"role": "assistant", "content": "dropped"}]
    assert template.encode_prompt(row) == ids_of(tok, head)
    assert template.encode_prompt(row[:1]) == ids_of(tok, head)
    assert template.encode_prompt(row, enable_thinking=False) == ids_of(tok, head + EMPTY_THINK)
    assert template.encode_prompt(row, enable_thinking=True) == ids_of(tok, head)
    with pytest.raises(SampleTooLongError):
        Template(tok, max_length=3).encode_prompt(row)
    assert (
        Template(tok, max_length=3, truncation_strategy="left").encode_prompt(row) == ids_of(tok, head)[-3:]
    )


# ------------------------------------------------------------------ bad input


def test_bad_input_gives_clear_errors(tiny_tokenizer):
    tok = tiny_tokenizer
    with pytest.raises(ValueError, match=r"messages\[1\]: field 'role'"):
        Template(tok).encode([{"role": "user", "content": "a"}, {"role": "bot", "content": "b"}])
    with pytest.raises(ValueError, match=r"messages\[1\] \(assistant\): field 'content'"):
        Template(tok).encode([{"role": "user", "content": "a"}, {"role": "assistant"}])
    with pytest.raises(ValueError, match="no assistant message"):
        Template(tok).encode([{"role": "user", "content": "a"}])
    with pytest.raises(ValueError, match="unknown part"):
        Template(tok, loss_scale="last_round+react")
    with pytest.raises(ValueError, match="truncation_strategy"):
        Template(tok, truncation_strategy="middle")


def test_parse_loss_scale():
    assert parse_loss_scale("default") == ("default", False)
    assert parse_loss_scale("all") == ("all", False)
    assert parse_loss_scale("ignore_empty_think") == ("default", True)
    assert parse_loss_scale("last_round+ignore_empty_think") == ("last_round", True)
    assert parse_loss_scale("all+ignore_empty_think") == ("all", True)
