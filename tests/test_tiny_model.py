"""The tiny offline model: loads in plain transformers, generates, and is reproducible."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from swiftray.models.tiny import make_tiny_model

torch.set_num_threads(1)


def test_loads_with_auto_classes_and_generates(tiny_model_dir):
    config = AutoConfig.from_pretrained(tiny_model_dir)
    assert config.model_type == "qwen3"
    assert config.architectures == ["Qwen3ForCausalLM"]
    assert (config.hidden_size, config.num_hidden_layers, config.head_dim) == (128, 2, 32)
    assert (config.num_attention_heads, config.num_key_value_heads) == (4, 2)

    tok = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert len(tok) == config.vocab_size == 2000
    assert tok.eos_token == "<|im_end|>" and tok.pad_token == "<|endoftext|>"
    assert config.eos_token_id == tok.eos_token_id and config.pad_token_id == tok.pad_token_id
    assert set(model.generation_config.eos_token_id) == {tok.eos_token_id, tok.pad_token_id}

    prompt_ids = tok.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )["input_ids"]
    out = model.generate(prompt_ids, max_new_tokens=8, do_sample=False)
    assert out.shape[0] == 1 and prompt_ids.shape[1] < out.shape[1] <= prompt_ids.shape[1] + 8
    assert isinstance(tok.decode(out[0, prompt_ids.shape[1] :]), str)


def test_tokenizer_splits_digits_and_keeps_chat_tokens_whole(tiny_tokenizer):
    tok = tiny_tokenizer
    pieces = tok.tokenize("12345+678=")
    assert pieces[:5] == ["1", "2", "3", "4", "5"] and pieces[6:9] == ["6", "7", "8"]
    for special in [
        "<|im_start|>",
        "<|im_end|>",
        "<|endoftext|>",
        "<think>",
        "</think>",
        "<tool_call>",
        "</tool_call>",
    ]:
        ids = tok(special, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and tok.convert_ids_to_tokens(ids[0]) == special
    # think and tool tags are ordinary added tokens, as in Qwen3: they survive skip_special_tokens.
    ids = tok("<|im_start|><think>\nok\n</think>", add_special_tokens=False)["input_ids"]
    assert tok.decode(ids, skip_special_tokens=True) == "<think>\nok\n</think>"
    text = "你好，世界! The answer is 42."
    assert tok.decode(tok(text, add_special_tokens=False)["input_ids"]) == text
    assert tok.chat_template and "<|im_start|>" in tok.chat_template
    assert (
        tok.bos_token is None and tok("hi")["input_ids"] == tok("hi", add_special_tokens=False)["input_ids"]
    )


def test_saved_configs_are_readable_by_older_transformers(tiny_model_dir):
    config = json.loads((tiny_model_dir / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast"
    assert config["model_max_length"] == 2048
    model_config = json.loads((tiny_model_dir / "config.json").read_text())
    assert model_config["rope_theta"] == model_config["rope_parameters"]["rope_theta"]


def test_same_seed_gives_identical_files_other_seed_other_weights(tmp_path, tiny_model_dir):
    again = make_tiny_model(tmp_path / "again", seed=0)
    other = make_tiny_model(tmp_path / "other", seed=1)
    for name in ["model.safetensors", "tokenizer.json", "config.json", "generation_config.json"]:
        assert (again / name).read_bytes() == (tiny_model_dir / name).read_bytes(), name
    assert (other / "tokenizer.json").read_bytes() == (tiny_model_dir / "tokenizer.json").read_bytes()
    assert (other / "model.safetensors").read_bytes() != (tiny_model_dir / "model.safetensors").read_bytes()


def test_building_leaves_the_global_rng_alone(tmp_path):
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    make_tiny_model(tmp_path / "m", seed=7, num_layers=1)
    assert torch.equal(torch.rand(3), expected)


def test_sizes_and_extra_corpus(tmp_path):
    path = make_tiny_model(
        tmp_path / "m",
        hidden_size=64,
        num_layers=1,
        num_heads=2,
        num_kv_heads=1,
        intermediate_size=96,
        vocab_size=2500,
        corpus=["zyxwvut qponmlk " * 3] * 5,
    )
    config = AutoConfig.from_pretrained(path)
    assert (config.hidden_size, config.num_hidden_layers, config.intermediate_size) == (64, 1, 96)
    tok = AutoTokenizer.from_pretrained(path)
    assert len(tok) <= config.vocab_size == 2500
    assert tok.tokenize("zyxwvut") == ["zyxwvut"]  # the extra text was learnt as a word


def test_rejects_head_dim_below_32(tmp_path):
    with pytest.raises(ValueError, match="head_dim"):
        make_tiny_model(tmp_path / "m", head_dim=16)
