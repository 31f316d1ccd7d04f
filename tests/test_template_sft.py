"""`swiftray sft` end to end with a named chat template (DeepSeek-R1, Phi-3, gpt-oss) on the tiny model.

The tokenizer with the template comes from `load_tokenizer(model, template=NAME)` and is
saved into a copy of the tiny model folder, which SFT then trains from: what
`--template NAME` does once the driver passes the flag to `load_tokenizer`.
"""

from __future__ import annotations

import shutil

import pytest
from _ray import ray_cluster  # noqa: F401
from _sft import metric_by_step, run_sft

from swiftray.data.chat_templates import resolve_chat_template
from swiftray.data.template import IGNORE_INDEX, Template
from swiftray.models.loader import load_tokenizer

# name -> the family's end token, which every trained turn must end with.
END_TOKENS = {"deepseek_r1": "<｜end▁of▁sentence｜>", "phi3": "<|end|>", "gpt_oss": "<|return|>"}
ROW = [{"role": "user", "content": "What is 2 + 3?"},
       {"role": "assistant", "content": "<think>\n2 + 3 = 5\n</think>\n\n<answer>5</answer>"}]


@pytest.mark.parametrize("name", sorted(END_TOKENS))
def test_sft_with_a_named_template(ray_cluster, tiny_model_dir, tmp_path, name):  # noqa: F811
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    load_tokenizer(str(model), template=name).save_pretrained(model)

    tokenizer = load_tokenizer(str(model))
    assert tokenizer.chat_template == resolve_chat_template(name)
    template = Template(tokenizer)
    assert template.describe == f"chat template {name!r}" and template.marked  # trained by TRL's variant
    encoded = template.encode(ROW)
    trained = tokenizer.decode([t for t in encoded["labels"] if t != IGNORE_INDEX])
    assert trained.endswith(f"<answer>5</answer>{END_TOKENS[name]}"), trained

    run = run_sft(model, tmp_path / "out", "--train_type", "full", "--learning_rate", "2e-3",
                  "--dataset", "swiftray/arithmetic#48", "--max_steps", 12,
                  "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 1,
                  "--save_strategy", "no")
    loss = metric_by_step(run, "train/loss")
    assert sorted(loss) == list(range(1, 13))
    first, last = (sum(loss[s] for s in steps) / 3 for steps in ((1, 2, 3), (10, 11, 12)))
    assert last < first - 1.0, loss
