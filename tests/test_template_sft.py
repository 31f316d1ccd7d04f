"""`swiftray sft` end to end with a named chat template (DeepSeek-R1, Phi-3, gpt-oss) on the tiny model.

The tiny model's own tokenizer carries a Qwen3-style template; `--template NAME` replaces it for
the run: the rows are encoded with the named family's template, and the checkpoint's tokenizer
carries it, so `infer` and `export` from the checkpoint use the same template.
"""

from __future__ import annotations

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
    assert load_tokenizer(str(tiny_model_dir)).chat_template != resolve_chat_template(name)
    tokenizer = load_tokenizer(str(tiny_model_dir), template=name)
    assert tokenizer.chat_template == resolve_chat_template(name)
    template = Template(tokenizer)
    assert template.describe == f"chat template {name!r}" and template.marked  # trained by TRL's variant
    encoded = template.encode(ROW)
    trained = tokenizer.decode([t for t in encoded["labels"] if t != IGNORE_INDEX])
    assert trained.endswith(f"<answer>5</answer>{END_TOKENS[name]}"), trained

    run = run_sft(tiny_model_dir, tmp_path / "out", "--template", name, "--train_type", "full",
                  "--learning_rate", "2e-3", "--dataset", "swiftray/arithmetic#48", "--max_steps", 12,
                  "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 1,
                  "--save_strategy", "steps", "--save_steps", 12)
    loss = metric_by_step(run, "train/loss")
    assert sorted(loss) == list(range(1, 13))
    first, last = (sum(loss[s] for s in steps) / 3 for steps in ((1, 2, 3), (10, 11, 12)))
    assert last < first - 1.0, loss
    assert load_tokenizer(str(run / "checkpoint-12")).chat_template == resolve_chat_template(name)
