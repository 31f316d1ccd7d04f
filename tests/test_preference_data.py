"""Preference rows: ms-swift's pair and KTO formats through the loader, their errors, the encoding into
prompt + chosen/rejected completions, and the pair batch layout the losses and prompt sharing read.

Expected ids are built from hand-written text pieces (as in test_template.py), never by calling the code
under test.
"""

from __future__ import annotations

import json

import datasets
import pandas as pd
import pytest
import torch

from swiftray.algorithms.preference_math import sequence_logps, split_pairs
from swiftray.data.formats import DatasetFormatError
from swiftray.data.loader import load_datasets
from swiftray.data.preference import (
    add_kto_kl_completions,
    encode_pair,
    encode_preference_dataset,
    kto_batch,
    normalize_kto_row,
    normalize_pair_row,
    preference_batch,
)
from swiftray.data.template import IGNORE_INDEX, SampleTooLongError, Template
from swiftray.models.prompt_sharing import pack_shared_prompts

datasets.disable_progress_bars()
S, E = "<|im_start|>", "<|im_end|>"
USER, GOOD, BAD = "What is 2 + 3?", "2 + 3 = 5", "2 + 3 = 6"
CHOSEN = [{"role": "user", "content": USER}, {"role": "assistant", "content": GOOD}]
REJECTED = [{"role": "user", "content": USER}, {"role": "assistant", "content": BAD}]


def write_jsonl(rows: list[dict], path) -> str:
    with open(path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def load_pairs(rows: list[dict], tmp_path, **kw) -> datasets.Dataset:
    return load_datasets([write_jsonl(rows, tmp_path / "pairs.jsonl")], shuffle=False,
                         normalize=normalize_pair_row, **kw)


# ---------------------------------------------------------------- pair formats


@pytest.mark.parametrize("row", [
    {"messages": CHOSEN, "rejected_response": BAD},
    {"messages": CHOSEN, "rejected_response": [{"role": "assistant", "content": BAD}]},
    {"messages": CHOSEN, "rejected_messages": REJECTED},
    {"query": USER, "response": GOOD, "rejected_response": BAD},
    {"prompt": USER, "chosen": GOOD, "rejected": BAD},
    {"prompt": [{"role": "user", "content": USER}], "chosen": [{"role": "assistant", "content": GOOD}],
     "rejected": [{"role": "assistant", "content": BAD}]},
    {"chosen": CHOSEN, "rejected": REJECTED},
    {"messages": [{"role": "user", "content": USER}], "chosen": GOOD, "rejected": BAD},
], ids=["rejected_response", "rejected_response_list", "rejected_messages", "query_response", "trl_strings",
        "trl_conversational", "implicit_prompt", "messages_prompt"])
def test_every_pair_format_gives_messages_and_rejected_messages(row, tmp_path):
    ds = load_pairs([{**row, "solution": "5"}, {**row, "solution": "5"}], tmp_path)
    assert set(ds.column_names) == {"messages", "rejected_messages", "solution"}  # consumed columns dropped
    assert ds[0]["messages"] == CHOSEN and ds[0]["rejected_messages"] == REJECTED
    assert ds[0]["solution"] == "5"


def test_rejected_response_replaces_everything_after_the_last_user_turn():
    agent = [{"role": "system", "content": "S"}, {"role": "user", "content": "weather?"},
             {"role": "assistant", "content": "call tool"}, {"role": "tool", "content": "sunny"},
             {"role": "assistant", "content": "It is sunny."}]
    out = normalize_pair_row({"messages": agent, "rejected_response": "I don't know."})
    assert out["rejected_messages"] == agent[:2] + [{"role": "assistant", "content": "I don't know."}]
    sys_col = normalize_pair_row({"system": "Be brief.", "messages": CHOSEN, "rejected_messages": REJECTED})
    assert sys_col["rejected_messages"][0] == {"role": "system", "content": "Be brief."}
    assert sys_col["messages"][0] == {"role": "system", "content": "Be brief."}


@pytest.mark.parametrize("row, field", [
    ({"messages": CHOSEN}, "rejected_response"),
    ({"messages": CHOSEN, "rejected_response": None}, "rejected_response"),
    ({"prompt": USER, "chosen": GOOD}, "rejected"),
    ({"messages": CHOSEN, "rejected_response": "   "}, "rejected_response"),
    ({"messages": CHOSEN, "rejected_response": GOOD}, "rejected_response"),
    ({"messages": CHOSEN, "rejected_messages": [{"role": "user", "content": USER}]}, "rejected_messages"),
    ({"chosen": GOOD, "rejected": BAD}, "chosen"),
    ({"messages": CHOSEN, "rejected_response": BAD, "margin": "wide"}, "margin"),
])
def test_a_bad_pair_row_names_file_line_and_field(row, field, tmp_path):
    good = {"messages": CHOSEN, "rejected_response": BAD}
    path = write_jsonl([good, good, row], tmp_path / "bad.jsonl")
    with pytest.raises(DatasetFormatError) as err:
        load_datasets([path], normalize=normalize_pair_row)
    assert str(err.value).startswith(f"{path} line 3, field '{field}'"), str(err.value)
    kept = load_datasets([path], normalize=normalize_pair_row, strict=False)  # non-strict drops the row
    assert len(kept) == 2


def test_margin_is_kept_as_a_number(tmp_path):
    ds = load_pairs([{"messages": CHOSEN, "rejected_response": BAD, "margin": m} for m in (1, "0.5", 2.25)],
                    tmp_path)
    assert ds["margin"] == [1.0, 0.5, 2.25]


# ---------------------------------------------------------------- KTO rows


def test_kto_labels_accept_booleans_and_their_spellings(tmp_path):
    labels = [True, False, 1, 0, "true", "False", "1", "0"]
    rows = [{"messages": CHOSEN, "label": lab} for lab in labels]
    path = write_jsonl(rows, tmp_path / "kto.jsonl")
    ds = load_datasets([path], shuffle=False, normalize=normalize_kto_row)
    assert ds["label"] == [True, False, True, False, True, False, True, False]


@pytest.mark.parametrize("label", ["maybe", 2, 0.5, None, [True]])
def test_a_non_boolean_kto_label_names_file_line_and_field(label, tmp_path):
    rows = [{"messages": CHOSEN, "label": True}, {"messages": REJECTED, "label": label}]
    path = write_jsonl(rows, tmp_path / "kto.jsonl")
    with pytest.raises(DatasetFormatError, match=rf"^{path} line 2, field 'label': .*expected a boolean"):
        load_datasets([path], normalize=normalize_kto_row)


def test_kto_label_from_csv_names_the_row(tmp_path):
    path = str(tmp_path / "kto.csv")
    pd.DataFrame({"query": [USER, USER], "response": [GOOD, BAD], "label": ["true", "perhaps"]}).to_csv(
        path, index=False)
    with pytest.raises(DatasetFormatError, match=rf"^{path} row index 1, field 'label'"):
        load_datasets([path], normalize=normalize_kto_row)
    assert normalize_kto_row({"query": USER, "response": GOOD, "label": "TRUE"})["label"] is True


# ---------------------------------------------------------------- encoding


@pytest.fixture()
def template(tiny_tokenizer) -> Template:
    return Template(tiny_tokenizer, loss_scale="last_round")


def ids(tok, text: str) -> list[int]:
    return tok(text, add_special_tokens=False)["input_ids"]


def test_pair_encoding_prompt_once_and_sft_labels_on_the_last_answer(template, tiny_tokenizer):
    tok = tiny_tokenizer
    history = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"}]
    row = normalize_pair_row({"messages": history + CHOSEN, "rejected_response": BAD})
    enc = encode_pair(template, row)
    prompt_text = f"{S}user\nHi{E}\n{S}assistant\nHello!{E}\n{S}user\n{USER}{E}\n{S}assistant\n"
    assert enc["prompt_ids"] == ids(tok, prompt_text) == enc["rejected_prompt_ids"]
    for side, answer in (("chosen", GOOD), ("rejected", BAD)):
        answer_ids = ids(tok, f"<think>\n\n</think>\n\n{answer}{E}")
        assert enc[f"{side}_ids"] == enc[f"{side}_labels"] == answer_ids  # ends at eos, like a generation


def test_truncation_strategies(tiny_tokenizer):
    row = normalize_pair_row({"messages": CHOSEN, "rejected_response": BAD + " because I say so"})
    full = encode_pair(Template(tiny_tokenizer), row)
    plen = len(full["prompt_ids"])
    limit = plen + len(full["chosen_ids"]) - 1  # chosen just too long, rejected longer still
    with pytest.raises(SampleTooLongError):
        encode_pair(Template(tiny_tokenizer, max_length=limit), row)
    right = encode_pair(Template(tiny_tokenizer, max_length=limit, truncation_strategy="right"), row)
    assert right["prompt_ids"] == full["prompt_ids"]
    assert right["chosen_ids"] == full["chosen_ids"][: limit - plen]
    assert right["rejected_labels"] == full["rejected_labels"][: limit - plen]
    left = encode_pair(Template(tiny_tokenizer, max_length=limit, truncation_strategy="left"), row)
    assert left["chosen_ids"] == full["chosen_ids"] and left["prompt_ids"] == full["prompt_ids"][1:]
    cut = len(full["rejected_ids"]) - len(full["chosen_ids"]) + 1
    assert left["rejected_prompt_ids"] == full["prompt_ids"][cut:]


def test_encode_dataset_skips_too_long_rows_and_keeps_margins(tiny_tokenizer, caplog):
    rows = [{"messages": CHOSEN, "rejected_response": BAD, "margin": 0.5},
            {"messages": CHOSEN, "rejected_response": BAD + " and more words here to be long", "margin": 1.0}]
    ds = datasets.Dataset.from_list([normalize_pair_row(r) for r in rows])
    limit = len(encode_pair(Template(tiny_tokenizer), ds[0])["prompt_ids"]) + 20
    samples = encode_preference_dataset(ds, Template(tiny_tokenizer, max_length=limit))
    assert len(samples) == 1 and samples[0]["margin"] == 0.5
    assert "skipped 1 of 2 train rows longer than --max_length" in caplog.text


# ---------------------------------------------------------------- batches


def test_pair_batch_layout_and_log_probs_match_each_side_scored_alone(template, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, attn_implementation="sdpa").eval()
    rows = [normalize_pair_row({"query": f"What is {a} + {b}?", "response": f"{a + b}", "rejected_response": f"{a}"})
            for a, b in ((2, 3), (4, 4), (7, 1))]
    pairs = [encode_pair(template, r) for r in rows]
    batch = preference_batch(pairs, pad_token_id=0)
    assert batch["input_ids"].shape[0] == 6 and "margin" not in batch
    for i, pair in enumerate(pairs):
        for row, side, prompt in ((2 * i, "chosen", "prompt_ids"), (2 * i + 1, "rejected", "rejected_prompt_ids")):
            n, m = len(pair[prompt]), len(pair[f"{side}_ids"])
            assert batch["prompt_lens"][row] == n
            assert batch["input_ids"][row, : n + m].tolist() == pair[prompt] + pair[f"{side}_ids"]
            assert batch["labels"][row, : n + m].tolist() == [IGNORE_INDEX] * n + pair[f"{side}_labels"]
            assert batch["attention_mask"][row].sum() == n + m
    assert pack_shared_prompts(batch["input_ids"], batch["attention_mask"], batch["prompt_lens"].tolist()) is not None

    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    targets = batch["labels"][:, 1:]
    mask = targets != IGNORE_INDEX
    token_lp = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
    sums, lengths = sequence_logps(token_lp * mask, mask)
    chosen, rejected = split_pairs(sums)
    for i, pair in enumerate(pairs):
        for got, side in ((chosen[i], "chosen"), (rejected[i], "rejected")):
            seq = torch.tensor([pair["prompt_ids"] + pair[f"{side}_ids"]])
            with torch.no_grad():
                alone = torch.log_softmax(model(input_ids=seq).logits[0, :-1].double(), -1)
            want = sum(alone[len(pair["prompt_ids"]) + t - 1, tok].item()
                       for t, (tok, lab) in enumerate(zip(pair[f"{side}_ids"], pair[f"{side}_labels"]))
                       if lab != IGNORE_INDEX)
            assert got.item() == pytest.approx(want, abs=1e-4)
    assert split_pairs(lengths)[0].tolist() == [sum(x != IGNORE_INDEX for x in p["chosen_labels"]) for p in pairs]


def test_kto_kl_rows_rotate_within_each_batch_and_share_the_prompt(template):
    rows = [normalize_kto_row({"query": f"q{i}", "response": f"answer {i}", "label": i % 2 == 0})
            for i in range(5)]
    from swiftray.data.preference import encode_kto_example

    examples = add_kto_kl_completions([encode_kto_example(template, r) for r in rows], batch_size=2)
    # batches [0, 1], [2, 3], [4]: each example takes the previous one's completion, the first the last's
    assert [e["kl_ids"] for e in examples] == [examples[j]["completion_ids"] for j in (1, 0, 3, 2, 4)]
    batch = kto_batch(examples[:4], pad_token_id=0)
    assert batch["desirable"].tolist() == [True, False, True, False]
    assert batch["prompt_lens"][0::2].tolist() == batch["prompt_lens"][1::2].tolist()
    assert torch.equal(batch["input_ids"][1, : batch["prompt_lens"][1]], batch["input_ids"][0, : batch["prompt_lens"][0]])
    with pytest.raises(ValueError, match="at least 2"):
        add_kto_kl_completions(examples, batch_size=1)
