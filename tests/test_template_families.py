"""Every chat template TRL ships a training variant for, against transformers' assistant mask.

For each `trl/chat_templates/*_training.jinja` (and each official template that already has
`{% generation %}` blocks: LFM2.5), the tiny tokenizer gets the family's
special tokens (each `<|...|>`-style string in the template becomes one token) and its
bos/eos, and a corpus of conversations (system prompt, several turns, think content,
empty think, tool calls and results) is encoded. The expected labels are computed here
from `apply_chat_template(..., return_assistant_tokens_mask=True)`, token by token,
with the README's convention stated directly:

- a turn's labels start after the generation prompt: the leading masked tokens that the
  rendered prompt `apply_chat_template(messages[:i], add_generation_prompt=True)` also
  has at that place are dropped;
- a turn's labels end with its end token: trailing whitespace tokens are dropped, and the
  eos token a template appends to every finished conversation (Phi-3's `<|endoftext|>`:
  a conversation that ends with a user turn ends with it too).

swiftray's labels must equal them both with the marked template (generation blocks) and
with the same template stripped of its markers (header and end-token rule). Prompts
must equal the official template's generation prompt, and a tokenizer carrying the
official template must train exactly as with the training variant.
"""

from __future__ import annotations

import copy
import json
import re

import jinja2
import pytest

from swiftray.data.chat_templates import trl_template_dir
from swiftray.data.template import IGNORE_INDEX, Template

TRL = trl_template_dir()
TRAINING = sorted(p.stem.removesuffix("_training") for p in TRL.glob("*_training.jinja"))
# Templates with generation blocks: every training variant, and official templates that have them already.
MARKED = {**{f: TRL / f"{f}_training.jinja" for f in TRAINING},
          **{p.stem: p for p in TRL.glob("*.jinja")
             if not p.stem.endswith("_training") and re.search(r"\{%-?\s*generation", p.read_text(encoding="utf-8"))}}
# Strings a template writes that the family's tokenizer has as single tokens.
_TOKEN_RE = re.compile(r"<\|[^<>|\s]{1,40}\|>|<｜[^<>｜]{1,40}｜>|</?[a-z_]{2,30}>|<\|[a-z_]{2,20}>|<[a-z_]{2,20}\|>"
                       r"|\[/?INST\]|</?s>|<\|\"\|>")
# bos/eos of families whose template writes them (the tiny tokenizer has eos <|im_end|> and no bos).
SPECIALS = {
    "llama3": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot_id|>"},
    "phi3": {"eos_token": "<|endoftext|>"},
    "phi3_5": {"eos_token": "<|endoftext|>"},
    "gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "gemma3": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "diffusion_gemma": {"bos_token": "<bos>", "eos_token": "<eos>"},
    "deepseek_r1_distill": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    "deepseekv3": {"bos_token": "<｜begin▁of▁sentence｜>", "eos_token": "<｜end▁of▁sentence｜>"},
    "gptoss": {"eos_token": "<|return|>"},
    "glm4moe": {"eos_token": "<|endoftext|>"},
    "cohere": {"bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>"},
    "cohere2": {"bos_token": "<BOS_TOKEN>", "eos_token": "<|END_OF_TURN_TOKEN|>"},
    "llava_next": {"bos_token": "<s>", "eos_token": "</s>"},
    "idefics3": {"eos_token": "<end_of_utterance>"},
    "smolvlm": {"eos_token": "<end_of_utterance>"},
    "lfm2": {"bos_token": "<|startoftext|>"},
    "lfm2_v2": {"bos_token": "<|startoftext|>"},
    "muse_glimmer": {"bos_token": "<|begin_of_text|>", "eos_token": "<|eot|>"},
}
# Multimodal templates that read contents as [{"type": "text", "text": ...}] blocks.
TEXT_BLOCKS = {"idefics3", "smolvlm", "llava_next"}

TOOLS = [{"type": "function", "function": {
    "name": "add", "description": "Add two integers.",
    "parameters": {"type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}},
                   "required": ["a", "b"]}}}]


def _call(a: int, b: int, as_json: bool = False) -> dict:
    args = {"a": a, "b": b}
    return {"type": "function", "function": {"name": "add", "arguments": json.dumps(args) if as_json else args}}


CORPUS = {
    "one_turn": [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "It is 5."}],
    "system_three_turns": [
        {"role": "system", "content": "You are a terse math tutor."},
        {"role": "user", "content": "Hi there"}, {"role": "assistant", "content": "Hello! How can I help?"},
        {"role": "user", "content": "What is 12 + 7?"}, {"role": "assistant", "content": "12 + 7 = 19."},
        {"role": "user", "content": "And 19 * 2?"}, {"role": "assistant", "content": "38."}],
    "think": [{"role": "user", "content": "What is 4 * 6?"},
              {"role": "assistant", "content": "<think>\nFour sixes are 24.\n</think>\n\nThe answer is 24."}],
    "think_in_history": [
        {"role": "system", "content": "Think step by step."},
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "<think>\nThree plus four.\n</think>\n\n7."},
        {"role": "user", "content": "Double it."},
        {"role": "assistant", "content": "<think>\nTwice seven.\n</think>\n\n14."}],
    "empty_think": [
        {"role": "user", "content": "Say hello."}, {"role": "assistant", "content": "<think>\n\n</think>\n\nHello!"},
        {"role": "user", "content": "Again."}, {"role": "assistant", "content": "<think>\n\n</think>\n\nHello again!"}],
    "reasoning_field": [
        {"role": "user", "content": "What is 9 - 4?"},
        {"role": "assistant", "content": "5.", "reasoning_content": "Nine minus four is five.",
         "thinking": "Nine minus four is five."}],
    "tool_call": [
        {"role": "system", "content": "Use tools when useful."}, {"role": "user", "content": "Add 2 and 3."},
        {"role": "assistant", "content": "", "tool_calls": [_call(2, 3)]}, {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "2 + 3 = 5."}],
    "tool_calls_json_arguments": [
        {"role": "user", "content": "Add 2 and 3, then 4 and 5."},
        {"role": "assistant", "content": "", "tool_calls": [_call(2, 3, True)]}, {"role": "tool", "content": "5"},
        {"role": "assistant", "content": "", "tool_calls": [_call(4, 5, True)]}, {"role": "tool", "content": "9"},
        {"role": "assistant", "content": "The sums are 5 and 9."},
        {"role": "user", "content": "Thanks."}, {"role": "assistant", "content": "You are welcome."}],
}


def family_tokenizer(base, family: str, chat_template: str):
    """A copy of the tiny tokenizer with the family's special tokens, bos/eos and chat template."""
    tok = copy.deepcopy(base)
    specials = SPECIALS.get(family, {})
    tok.add_tokens(sorted(set(_TOKEN_RE.findall(chat_template)) | set(specials.values())), special_tokens=True)
    for key, value in specials.items():
        setattr(tok, key, value)
    tok.chat_template = chat_template
    return tok


def strip_markers(chat_template: str) -> str:
    return re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", chat_template)


def as_blocks(messages: list[dict]) -> list[dict]:
    return [{**m, "content": [{"type": "text", "text": m["content"]}]} if isinstance(m["content"], str) else m
            for m in messages]


def render_ids(tok, messages, tools, **kwargs) -> list[int]:
    return tok(tok.apply_chat_template(messages, tools=tools, tokenize=False, **kwargs),
               add_special_tokens=False)["input_ids"]


def expected_labels(tok, messages: list[dict], tools) -> dict[str, list[int]]:
    """transformers' assistant mask, narrowed to the convention (see the module docstring)."""
    out = tok.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True,
                                  return_assistant_tokens_mask=True)
    ids, mask = list(out["input_ids"]), list(out["assistant_masks"])
    runs, start = [], None
    for k, bit in enumerate([*mask, 0]):
        if bit and start is None:
            start = k
        elif not bit and start is not None:
            runs.append((start, k))
            start = None
    turns = [i for i, m in enumerate(messages) if m["role"] == "assistant"]
    assert len(runs) == len(turns), (runs, turns)
    # Does the template end a finished conversation with eos where a prompt gets the generation prompt
    # (Phi-3)? Then that eos belongs to no turn.
    head = messages[:1 + (messages[0]["role"] == "system")]
    closed = tok.apply_chat_template(head, tokenize=False).rstrip()
    opened = tok.apply_chat_template(head, tokenize=False, add_generation_prompt=True)
    appends_eos = tok.eos_token is not None and closed.endswith(tok.eos_token) and not opened.startswith(closed)
    labels = [IGNORE_INDEX] * len(ids)
    for i, (a, b) in zip(turns, runs):
        prompt = render_ids(tok, messages[:i], tools, add_generation_prompt=True)
        shared = min(a, len(prompt))
        assert prompt[:shared] == ids[:shared], f"the prompt of message {i} is not a prefix of the conversation"
        while a < b and a < len(prompt) and prompt[a] == ids[a]:
            a += 1
        if b == len(ids) and ids[-1] == tok.eos_token_id and appends_eos:
            b -= 1
        while b > a and tok.decode(ids[b - 1]).isspace():
            b -= 1
        labels[a:b] = ids[a:b]
    return {"input_ids": ids, "labels": labels}


# Without markers, a turn that calls a tool ends with the token the template closes such a turn with.
# Diffusion-Gemma writes <|tool_response>, which its training template leaves outside the block.
UNMARKED_CALL_CLOSERS = {"diffusion_gemma": "<|tool_response>"}


def with_unmarked_call_closer(tok, family: str, want: dict[str, list[int]]) -> dict[str, list[int]]:
    closer = UNMARKED_CALL_CLOSERS.get(family)
    if closer is None:
        return want
    ids, labels = want["input_ids"], list(want["labels"])
    closer_id = tok.convert_tokens_to_ids(closer)
    for k in range(1, len(ids)):
        if ids[k] == closer_id and labels[k - 1] != IGNORE_INDEX:
            labels[k] = ids[k]
    return {"input_ids": ids, "labels": labels}


def trained_text(tok, encoded: dict[str, list[int]]) -> list[str]:
    """The trained tokens as text, for readable failures."""
    return [tok.decode(t) if t != IGNORE_INDEX else "·" for t in encoded["labels"]]


@pytest.mark.parametrize("family", sorted(MARKED))
def test_labels_equal_the_assistant_mask_up_to_the_convention(tiny_tokenizer, family):
    text = MARKED[family].read_text(encoding="utf-8")
    tok = family_tokenizer(tiny_tokenizer, family, text)
    plain = family_tokenizer(tiny_tokenizer, family, strip_markers(text))
    marked, unmarked = Template(tok), Template(plain)
    assert marked.marked and not unmarked.marked
    assert marked.text_blocks == unmarked.text_blocks == (family in TEXT_BLOCKS)
    checked = 0
    for name, messages in CORPUS.items():
        tools = TOOLS if "tool" in name else None
        given = as_blocks(messages) if family in TEXT_BLOCKS else messages
        try:
            tok.apply_chat_template(given, tools=tools, tokenize=False)
        except (jinja2.TemplateError, TypeError) as err:  # the family's template rejects this conversation
            for template in (marked, unmarked):
                with pytest.raises(ValueError, match=r"cannot render this conversation: \S") as caught:
                    template.encode(messages, tools=tools)
                assert "\n" not in str(caught.value), err
            continue
        want = expected_labels(tok, given, tools)
        for template in (marked, unmarked):
            got = template.encode(messages, tools=tools)
            assert got["input_ids"] == want["input_ids"], (name, template.marked)
            if not template.marked:
                want = with_unmarked_call_closer(tok, family, want)
            assert trained_text(tok, got) == trained_text(tok, want), (name, template.marked)
            assert got["labels"] == want["labels"], (name, template.marked)
        checked += 1
    assert checked >= 1


@pytest.mark.parametrize("family", [f for f in TRAINING if (TRL / f"{f}.jinja").is_file()])
def test_official_template_prompts_and_training_labels(tiny_tokenizer, family):
    official = (TRL / f"{family}.jinja").read_text(encoding="utf-8")
    training = (TRL / f"{family}_training.jinja").read_text(encoding="utf-8")
    tok = family_tokenizer(tiny_tokenizer, family, official)
    trained_by = Template(family_tokenizer(tiny_tokenizer, family, training))
    template = Template(tok)
    assert template.training_template == training  # the official template is recognised
    thinking = (None, True, False) if "enable_thinking" in official else (None,)
    for name, messages in CORPUS.items():
        tools = TOOLS if "tool" in name else None
        given = as_blocks(messages) if family in TEXT_BLOCKS else messages
        last = max(i for i, m in enumerate(messages) if m["role"] == "assistant")
        try:
            want = {flag: render_ids(tok, given[:last], tools, add_generation_prompt=True,
                                     **({} if flag is None else {"enable_thinking": flag})) for flag in thinking}
        except Exception:
            with pytest.raises(ValueError, match="cannot render this conversation"):
                template.encode_prompt(messages[:last], tools=tools)
            continue
        for flag in thinking:
            assert template.encode_prompt(messages[:last], flag, tools=tools) == want[flag], (name, flag)
            # a final assistant turn is dropped
            assert template.encode_prompt(messages, flag, tools=tools) == want[flag], (name, flag)
        try:
            reference = trained_by.encode(messages, tools=tools)
        except ValueError:
            continue
        assert template.encode(messages, tools=tools) == reference, name
