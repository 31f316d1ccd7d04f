"""HF <-> megatron-core conversion and the sharding maths, without starting Megatron ranks.

Round trips are bit-exact; the q/k/v interleave and the TP slices are checked against their
definitions on random tensors; the tiny MoE model is a real Qwen3-MoE that transformers runs.
"""

from __future__ import annotations

import json

import pytest
import torch

from swiftray.cli import main as cli_main
from swiftray.megatron import convert, hf_map
from swiftray.megatron.sharding import Piece, merge, take
from swiftray.models.tiny import make_tiny_model

torch.set_num_threads(1)


@pytest.fixture(scope="module")
def tiny_moe_dir(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tiny_moe"), moe=True)


def test_tiny_moe_model_is_a_deterministic_qwen3_moe(tiny_moe_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    config = json.loads((tiny_moe_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3MoeForCausalLM"] and config["model_type"] == "qwen3_moe"
    shape = convert.model_shape_of(tiny_moe_dir)
    assert (shape.num_experts, shape.topk, shape.head_dim, shape.tied) == (4, 2, 32, False)
    assert shape.norm_topk_prob and all(shape.moe_layers)
    again = make_tiny_model(tmp_path / "again", moe=True)
    assert (again / "model.safetensors").read_bytes() == (tiny_moe_dir / "model.safetensors").read_bytes()
    model = AutoModelForCausalLM.from_pretrained(tiny_moe_dir)
    out = model.generate(torch.tensor([[5, 6, 7]]), max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 7)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_round_trip_is_bit_exact(kind, tiny_model_dir, tiny_moe_dir, tmp_path):
    source = tiny_model_dir if kind == "dense" else tiny_moe_dir
    mcore = convert.hf_to_mcore(source, tmp_path / "mcore")
    back = convert.mcore_to_hf(mcore, tmp_path / "hf")
    before, after = convert.SafetensorsFolder(source, "model"), convert.SafetensorsFolder(back, "model")
    assert sorted(before.keys()) == sorted(after.keys())
    assert all(torch.equal(before.get(k), after.get(k)) for k in before.keys())
    shape = convert.model_shape_of(source)
    stored = convert.SafetensorsFolder(mcore, "mcore_model")
    assert sorted(stored.keys()) == sorted(hf_map.canonical_names(shape))
    assert all(tuple(stored.get(n).shape) == hf_map.canonical_shape(shape, n) for n in stored.keys())
    # The side files travel, so that a converted folder is a whole model (tokenizer, config).
    assert (mcore / "tokenizer.json").is_file() and (back / "config.json").is_file()
    assert convert.is_mcore_dir(mcore) and not convert.is_mcore_dir(back)


def test_qkv_layout_is_megatrons_per_group_interleave():
    shape = hf_map.ModelShape("qwen3", 1, 16, 32, num_heads=6, num_kv_heads=2, head_dim=4, vocab_size=10, tied=True,
                              norm_eps=1e-6, rope_theta=1e4, max_position_embeddings=8)
    q, k, v = torch.randn(24, 16), torch.randn(8, 16), torch.randn(8, 16)
    qkv = hf_map.qkv_to_mcore(q, k, v, shape)
    per_group = (3 + 2) * 4  # 3 query heads, one key head, one value head of 4 rows each
    for g in range(2):
        rows = qkv[g * per_group:(g + 1) * per_group]
        assert torch.equal(rows[:12], q[g * 12:(g + 1) * 12])  # query heads 3g..3g+2 share KV head g
        assert torch.equal(rows[12:16], k[g * 4:(g + 1) * 4]) and torch.equal(rows[16:], v[g * 4:(g + 1) * 4])
    assert all(torch.equal(a, b) for a, b in zip(hf_map.qkv_from_mcore(qkv, shape), (q, k, v)))


@pytest.mark.parametrize("kind", ["rows", "cols", "glu", "whole"])
@pytest.mark.parametrize("parts", [1, 2, 4])
def test_tp_slices_put_back_together(kind, parts):
    full = torch.randn(16, 8)
    pieces = [take(full, Piece("w", kind, r, parts, True)) for r in range(parts)]
    assert torch.equal(merge(pieces, kind), full)
    if kind == "glu" and parts == 2:  # rank r holds [gate chunk r; up chunk r]
        gate, up = full[:8], full[8:]
        assert torch.equal(pieces[1], torch.cat([gate[4:], up[4:]]))
    if kind == "cols":
        assert pieces[-1].shape == (16, 8 // parts)


@pytest.mark.parametrize("kind", ["dense", "moe"])
def test_runtime_names_are_the_live_transformers_names(kind, tiny_model_dir, tiny_moe_dir):
    """What export_weights sends a rollout engine: a live model's state_dict names (fused experts, tied head)."""
    from transformers import AutoModelForCausalLM

    folder = tiny_model_dir if kind == "dense" else tiny_moe_dir
    shape = convert.model_shape_of(folder)
    source = convert.SafetensorsFolder(folder, "model")
    canonical = dict(hf_map.hf_to_canonical(source.get, shape))
    live = AutoModelForCausalLM.from_pretrained(folder).state_dict()
    fused = any(k.endswith("experts.gate_up_proj") for k in live)
    named = dict(hf_map.fuse_experts_for_runtime(hf_map.canonical_to_hf(canonical.__getitem__, shape), shape, fused))
    assert named.keys() == live.keys()
    assert all(torch.equal(named[k], live[k]) for k in live)


def test_export_command_converts_both_ways(tiny_model_dir, tmp_path, capsys):
    cli_main(["export", "--model", str(tiny_model_dir), "--to_mcore", "true", "--output_dir", str(tmp_path / "m")])
    cli_main(["export", "--mcore_model", str(tmp_path / "m"), "--to_hf", "true", "--output_dir", str(tmp_path / "h")])
    a, b = convert.SafetensorsFolder(tiny_model_dir, "model"), convert.SafetensorsFolder(tmp_path / "h", "model")
    assert all(torch.equal(a.get(k), b.get(k)) for k in a.keys())
    for argv, message in [
        (["--mcore_model", str(tiny_model_dir), "--to_hf", "true"], "not a megatron-core folder"),
        (["--model", str(tmp_path / "m"), "--to_mcore", "true"], "already a megatron-core folder"),
        (["--model", str(tiny_model_dir), "--to_mcore", "true", "--to_hf", "true"], "opposite directions"),
        (["--to_hf", "true"], "needs --mcore_model"),
    ]:
        with pytest.raises(SystemExit):
            cli_main(["export", *argv])
        assert message in capsys.readouterr().err


def test_unsupported_models_are_refused_by_name(tmp_path):
    with pytest.raises(ValueError, match="model_type 'llama' is not supported"):
        hf_map.model_shape({"model_type": "llama"})
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen3", "attention_bias": True}))
    with pytest.raises(ValueError, match="attention_bias"):
        convert.model_shape_of(tmp_path)
