"""`--template NAME` / `--template FILE` through load_tokenizer, and hand-written labels for the families
the old header/eos rule failed on (DeepSeek-R1, Phi-3, gpt-oss) plus a think template (Qwen3.5).

Expected ids are built by tokenising hand-written pieces of text one by one, as in test_template.py;
a piece is (text, gets_loss).
"""

from __future__ import annotations

import pytest
from test_template import check
from test_template_families import family_tokenizer

from swiftray.data.chat_templates import (
    TEMPLATE_FILES,
    known_template_names,
    resolve_chat_template,
    trl_template_dir,
)
from swiftray.data.template import Template
from swiftray.models.loader import load_tokenizer

TRL = trl_template_dir()
Q1, A1 = "What is 2 + 3?", "It is 5."
Q2, A2 = "And 4 + 4?", "It is 8."


def named(model_dir, name: str):
    """load_tokenizer with --template NAME, plus the family's special tokens (as the real tokenizer has)."""
    tok = load_tokenizer(str(model_dir), template=name)
    return family_tokenizer(tok, TEMPLATE_FILES[name], tok.chat_template)


# ------------------------------------------------------------------ names and files


def test_every_name_is_a_trl_template_and_load_tokenizer_applies_it(tiny_model_dir):
    for name, stem in TEMPLATE_FILES.items():
        assert (TRL / f"{stem}.jinja").is_file(), name
    tok = load_tokenizer(str(tiny_model_dir), template="deepseek_r1")
    assert tok.chat_template == (TRL / "deepseek_r1_distill.jinja").read_text(encoding="utf-8")
    assert resolve_chat_template("gptoss") == resolve_chat_template("gpt_oss")  # TRL's own stems work too
    assert load_tokenizer(str(tiny_model_dir)).chat_template != tok.chat_template  # no template: unchanged


def test_unknown_names_and_bad_files_fail_in_one_line(tiny_model_dir, tmp_path):
    with pytest.raises(ValueError, match=r"--template 'qwen4': unknown template name; known: qwen2_5, qwen3, ") as err:
        load_tokenizer(str(tiny_model_dir), template="qwen4")
    assert "\n" not in str(err.value) and "deepseek_r1" in str(err.value)
    assert {"qwen3", "deepseek_r1", "phi3", "gpt_oss", "glm4_5", "llama3", "gemma3"} <= set(known_template_names())
    with pytest.raises(ValueError, match="unknown template name"):
        resolve_chat_template("qwen3_training")  # training variants are swiftray's business, not a choice
    with pytest.raises(FileNotFoundError, match="no such template file"):
        load_tokenizer(str(tiny_model_dir), template=str(tmp_path / "missing.jinja"))
    not_jinja = tmp_path / "notes.jinja"
    not_jinja.write_text("just text", encoding="utf-8")
    with pytest.raises(ValueError, match="not a Jinja chat template"):
        resolve_chat_template(str(not_jinja))


def test_template_file_with_a_plain_text_header(tiny_model_dir, tmp_path):
    path = tmp_path / "plain.jinja"
    path.write_text(
        "{% for m in messages %}{% if m.role == 'user' %}User: {{ m.content }}\n"
        "{% else %}Assistant: {{ m.content }}<|endoftext|>\n{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Assistant:{% endif %}", encoding="utf-8")
    tok = load_tokenizer(str(tiny_model_dir), template=str(path))
    template = Template(tok)
    assert not template.marked and template.turns.gen_prompt == "Assistant:"
    messages = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]
    check(tok, template, messages,
          (f"User: {Q1}\nAssistant:", False), (f" {A1}<|endoftext|>", True),
          (f"\nUser: {Q2}\nAssistant:", False), (f" {A2}<|endoftext|>", True), ("\n", False))


# ------------------------------------------------------------------ families, by hand


def test_deepseek_r1_trains_after_the_opened_think_block(tiny_model_dir):
    tok = named(tiny_model_dir, "deepseek_r1")
    template = Template(tok)
    assert template.describe == "chat template 'deepseek_r1'" and template.marked
    bos, user, asst, eos = "<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<｜end▁of▁sentence｜>"
    messages = [{"role": "system", "content": "Be brief."},
                {"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                {"role": "user", "content": Q2}, {"role": "assistant", "content": f"<think>\n4 and 4\n</think>\n\n{A2}"}]
    # The generation prompt is <｜Assistant｜><think>\n: a turn that starts with it is trained after it,
    # one that does not (the first) after <｜Assistant｜>. The reasoning is kept (TRL's training variant).
    check(tok, template, messages,
          (f"{bos}Be brief.{user}{Q1}{asst}", False), (f"{A1}{eos}", True),
          (f"{user}{Q2}{asst}<think>\n", False), (f"4 and 4\n</think>\n\n{A2}{eos}", True))
    # ignore_empty_think drops the close of the block the generation prompt opened.
    empty = [{"role": "user", "content": Q1}, {"role": "assistant", "content": f"<think>\n\n</think>\n\n{A1}"}]
    check(tok, Template(tok, loss_scale="ignore_empty_think"), empty,
          (f"{bos}{user}{Q1}{asst}<think>\n", False), ("\n</think>\n\n", False), (f"{A1}{eos}", True))
    check(tok, template, empty, (f"{bos}{user}{Q1}{asst}<think>\n", False), (f"\n</think>\n\n{A1}{eos}", True))
    # Generation prompts are the official template's, which strips reasoning from history.
    assert template.encode_prompt(messages) == tok(
        f"{bos}Be brief.{user}{Q1}{asst}{A1}{eos}{user}{Q2}{asst}<think>\n", add_special_tokens=False)["input_ids"]


def test_phi3_trains_through_end_not_the_final_endoftext(tiny_model_dir):
    tok = named(tiny_model_dir, "phi3")
    tok.eos_token = "<|endoftext|>"
    template = Template(tok)
    messages = [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1},
                {"role": "user", "content": Q2}, {"role": "assistant", "content": A2}]
    check(tok, template, messages,
          (f"<|user|>\n{Q1}<|end|>\n<|assistant|>\n", False), (f"{A1}<|end|>", True),
          (f"\n<|user|>\n{Q2}<|end|>\n<|assistant|>\n", False), (f"{A2}<|end|>", True), ("\n<|endoftext|>", False))
    check(tok, Template(tok, loss_scale="last_round"), messages,
          (f"<|user|>\n{Q1}<|end|>\n<|assistant|>\n{A1}<|end|>\n<|user|>\n{Q2}<|end|>\n<|assistant|>\n", False),
          (f"{A2}<|end|>", True), ("\n<|endoftext|>", False))
    # The generation prompt replaces the final eos (it is not a suffix of the closed conversation).
    assert template.encode_prompt(messages[:1]) == tok(f"<|user|>\n{Q1}<|end|>\n<|assistant|>\n",
                                                       add_special_tokens=False)["input_ids"]


def test_gpt_oss_trains_every_channel_after_the_header(tiny_model_dir):
    tok = named(tiny_model_dir, "gpt_oss")
    template = Template(tok)
    tools = [{"type": "function", "function": {"name": "add", "description": "Add.", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}}}]
    messages = [{"role": "user", "content": Q1},
                {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": {"a": 2}}}]},
                {"role": "tool", "content": "5"},
                {"role": "assistant", "content": A1, "thinking": "The tool said 5."}]
    text = tok.apply_chat_template(messages, tools=tools, tokenize=False)
    preamble = text[: text.index("<|start|>user")]  # system and developer messages (with today's date)
    check(tok, template, messages,
          (f"{preamble}<|start|>user<|message|>{Q1}<|end|><|start|>assistant", False),
          (' to=functions.add<|channel|>commentary json<|message|>{"a": 2}<|call|>', True),
          ('<|start|>functions.add to=assistant<|channel|>commentary<|message|>"5"<|end|><|start|>assistant', False),
          ("<|channel|>analysis<|message|>The tool said 5.<|end|>"
           f"<|start|>assistant<|channel|>final<|message|>{A1}<|return|>", True),
          tools=tools)


def test_qwen3_5_think_prompt_opens_the_block(tiny_model_dir):
    tok = named(tiny_model_dir, "qwen3_5")
    template = Template(tok)
    messages = [{"role": "user", "content": Q1},
                {"role": "assistant", "content": A1, "reasoning_content": "Two plus three."}]
    check(tok, template, messages,
          (f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n<think>\n", False),
          (f"Two plus three.\n</think>\n\n{A1}<|im_end|>", True), ("\n", False))
    head = f"<|im_start|>user\n{Q1}<|im_end|>\n<|im_start|>assistant\n"
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]  # noqa: E731
    assert template.encode_prompt(messages) == ids(head + "<think>\n")
    assert template.encode_prompt(messages, enable_thinking=False) == ids(head + "<think>\n\n</think>\n\n")


# ------------------------------------------------------------------ unusable templates


def test_templates_that_cannot_be_used_fail_in_one_line(tiny_model_dir, tiny_tokenizer):
    gemma = Template(named(tiny_model_dir, "gemma"))
    with pytest.raises(ValueError, match=r"^chat template 'gemma' cannot render this conversation: "
                                         r"System role not supported$"):
        gemma.encode([{"role": "system", "content": "Be brief."}, {"role": "user", "content": Q1},
                      {"role": "assistant", "content": A1}])
    tok = family_tokenizer(tiny_tokenizer, "none", "{{ raise_exception('no chat here') }}")
    with pytest.raises(ValueError, match=r"cannot be used: a one-turn conversation fails \(no chat here\)$"):
        Template(tok)
    tok = family_tokenizer(tiny_tokenizer, "none", "{% for m in messages %}{{ m.role }}: ...\n{% endfor %}")
    with pytest.raises(ValueError, match="cannot be used: it drops the message contents"):
        Template(tok)
    # Generation blocks around user turns too: which block is whose cannot be told.
    tok = family_tokenizer(tiny_tokenizer, "none", "{% for m in messages %}{{ m.role }}: {% generation %}"
                           "{{ m.content }}<|im_end|>{% endgeneration %}{% endfor %}"
                           "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(ValueError, match=r"2 \{% generation %\} blocks for 1 assistant messages"):
        Template(tok).encode([{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}])


def test_multimodal_templates_get_text_blocks(tiny_model_dir):
    tok = named(tiny_model_dir, "idefics3")
    template = Template(tok)
    assert template.text_blocks
    check(tok, template, [{"role": "user", "content": Q1}, {"role": "assistant", "content": A1}],
          (f"<|begin_of_text|>User: {Q1}<end_of_utterance>\nAssistant:", False),
          (f" {A1}<end_of_utterance>", True), ("\n", False))
