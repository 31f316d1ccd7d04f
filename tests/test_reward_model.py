"""Reward-model head: a causal-LM folder loads as a one-output sequence classifier that scores each row's
last non-pad token, and what save_reward_model writes loads back in plain transformers with the same scores
(full weights, and LoRA merged)."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForSequenceClassification, AutoTokenizer

from swiftray.algorithms.preference_math import reward_model_loss
from swiftray.models.reward_model import load_reward_model, reward_scores, save_reward_model

torch.set_num_threads(1)
TEXTS = ["What is 2 + 3? 5", "Hello there, how are you today?", "7"]


def padded_batch(tokenizer, texts: list[str]) -> dict[str, torch.Tensor]:
    rows = [tokenizer(t, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for t in texts]
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), tokenizer.pad_token_id)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        ids[i, : len(r)], mask[i, : len(r)] = torch.tensor(r), 1
    return {"input_ids": ids, "attention_mask": mask}


def train_a_little(model, batch) -> None:
    """A few steps on chosen=row 0 vs rejected=row 1, so that every weight differs from the folder's."""
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(3):
        scores = reward_scores(model, **batch)
        loss, _ = reward_model_loss(scores[:1], scores[1:2], center_rewards_coefficient=0.01)
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_loads_as_a_scalar_head_scoring_the_last_real_token(tiny_model_dir):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_reward_model(str(tiny_model_dir)).eval()
    assert type(model).__name__ == "Qwen3ForSequenceClassification"
    assert model.config.num_labels == 1 and model.config.pad_token_id == tokenizer.pad_token_id
    assert tokenizer.pad_token_id != tokenizer.eos_token_id
    batch = padded_batch(tokenizer, TEXTS)
    with torch.no_grad():
        scores = reward_scores(model, **batch)
        for i in range(len(TEXTS)):  # each row alone, no padding: the head on its last hidden state
            n = int(batch["attention_mask"][i].sum())
            hidden = model.model(input_ids=batch["input_ids"][i : i + 1, :n]).last_hidden_state[0, -1]
            assert scores[i].item() == pytest.approx((hidden @ model.score.weight[0]).item(), abs=1e-5)
    again = load_reward_model(str(tiny_model_dir), seed=42)
    other = load_reward_model(str(tiny_model_dir), seed=7)
    assert torch.equal(again.score.weight, model.score.weight)  # a fresh head is seeded
    assert not torch.equal(other.score.weight, model.score.weight)


def test_saved_full_model_loads_back_in_transformers_with_the_same_scores(tiny_model_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = load_reward_model(str(tiny_model_dir))
    batch = padded_batch(tokenizer, TEXTS)
    train_a_little(model, batch)
    model.eval()
    with torch.no_grad():
        before = reward_scores(model, **batch)
    out = save_reward_model(model, str(tmp_path / "rm"), tokenizer)
    loaded = AutoModelForSequenceClassification.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(reward_scores(loaded, **batch), before)
        assert torch.equal(reward_scores(load_reward_model(out, seed=7).eval(), **batch), before)  # head read back


def test_saved_lora_model_is_merged_and_loads_back_with_the_same_scores(tiny_model_dir, tmp_path):
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(load_reward_model(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", modules_to_save=["score"]))
    batch = padded_batch(tokenizer, TEXTS)
    train_a_little(model, batch)
    model.eval()
    with torch.no_grad():
        before = reward_scores(model, **batch)
        base = reward_scores(load_reward_model(str(tiny_model_dir)).eval(), **batch)
    assert not torch.allclose(before, base, atol=1e-3)  # the adapter and head did change the scores
    loaded = AutoModelForSequenceClassification.from_pretrained(save_reward_model(model, str(tmp_path / "rm"))).eval()
    with torch.no_grad():
        assert torch.allclose(reward_scores(loaded, **batch), before, atol=1e-5)


def test_a_lora_reward_model_folder_loads_on_its_base_merged(tiny_model_dir, tmp_path):
    """What `--rlhf_type rm --train_type lora` saves (the adapter, the score head in full) is a --reward_model."""
    from peft import LoraConfig, get_peft_model

    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    model = get_peft_model(load_reward_model(str(tiny_model_dir)),
                           LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="SEQ_CLS"))
    batch = padded_batch(tokenizer, TEXTS)
    train_a_little(model, batch)
    model.eval()
    model.save_pretrained(tmp_path / "adapter")
    assert not (tmp_path / "adapter" / "config.json").exists()
    with torch.no_grad():
        want = reward_scores(model, **batch)
        got = reward_scores(load_reward_model(str(tmp_path / "adapter")).eval(), **batch)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
