"""`swiftray rlhf --rlhf_type dpo|kto|orpo|simpo|cpo|rm` end to end on the tiny model (a few steps each, in
this process on the session's Ray cluster), GRPO scored by the trained reward model alone, and bad preference
rows through the CLI (one line, exit code 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from _ray import REPO, ray_cluster  # noqa: F401  (session fixture)
from _sft import QUIET, read_log

from swiftray.arguments import RlhfArguments
from swiftray.cli_parser import parse_args

PAIRS = "swiftray/arithmetic-pairs:easy_train#8"
PAIR_METRICS = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
                "logps/rejected")
# rlhf_type: (dataset, extra flags, metrics it logs beside the loss)
RUNS = {
    "dpo": (PAIRS, ["--loss_type", "sigmoid", "bco_pair", "--loss_weights", "1", "0.5", "--rpo_alpha", "1",
                    "--val_dataset", "swiftray/arithmetic-pairs:easy_val#4", "--eval_steps", "2"],
            (*PAIR_METRICS, "nll_loss")),
    "kto": ("swiftray/arithmetic-pairs:easy_train_kto#8", ["--precompute_ref_log_probs", "true"],
            ("rewards/chosen", "rewards/rejected", "rewards/margins", "logps/chosen", "logps/rejected", "kl")),
    "orpo": (PAIRS, [], (*PAIR_METRICS, "nll_loss", "log_odds_ratio", "log_odds_chosen")),
    "simpo": (PAIRS, [], (*PAIR_METRICS, "nll_loss")),
    "cpo": (PAIRS, ["--loss_type", "hinge"], (*PAIR_METRICS, "nll_loss")),
    "rm": (PAIRS, ["--center_rewards_coefficient", "0.01"],
           ("rewards/chosen", "rewards/accuracies", "rewards/margins", "accuracy", "center_rewards_loss")),
}


def rlhf(model: Path, output_dir: Path, *flags: object) -> Path:
    from swiftray.controller import run_rlhf

    args = parse_args(RlhfArguments, ["--model", str(model), "--output_dir", str(output_dir), *QUIET,
                                      "--report_to", "none", *[str(f) for f in flags]])
    return run_rlhf(args)


@pytest.fixture(scope="module")
def runs(ray_cluster, tiny_model_dir, tmp_path_factory) -> dict[str, Path]:  # noqa: F811
    out = {}
    for algo, (dataset, flags, _metrics) in RUNS.items():
        # 2 pairs (or examples) per step, gathered over 2 micro-batches: 2 optimizer steps
        out[algo] = rlhf(tiny_model_dir, tmp_path_factory.mktemp(algo), "--rlhf_type", algo, "--dataset", dataset,
                         "--train_type", "full", "--learning_rate", "1e-4", "--max_steps", 2, "--save_steps", 2,
                         "--per_device_train_batch_size", 1, "--gradient_accumulation_steps", 2, *flags)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("algo", list(RUNS))
def test_each_method_trains_logs_its_metrics_and_saves(runs, algo):
    log = read_log(runs[algo])
    train = [r for r in log if "train/loss" in r]
    assert [r["step"] for r in train] == [1, 2]
    for metric in RUNS[algo][2]:
        assert any(f"train/{metric}" in r for r in train), metric
    assert all(r["train/grad_norm"] > 0 for r in train)
    args = json.loads((runs[algo] / "checkpoint-2" / "args.json").read_text())
    assert args["rlhf_type"] == algo and args["beta"] == {"simpo": 2.0, "rm": 0.1}.get(algo, 0.1)
    if algo == "dpo":
        evals = [r for r in log if "eval/loss" in r]
        assert evals and "eval/rewards/accuracies" in evals[0]


@pytest.mark.slow
def test_the_reward_model_loads_as_a_sequence_classifier_and_scores_grpo_alone(runs, tiny_model_dir, tmp_path):
    from transformers import AutoModelForSequenceClassification

    rm = runs["rm"] / "checkpoint-2"
    assert type(AutoModelForSequenceClassification.from_pretrained(rm)).__name__ == "Qwen3ForSequenceClassification"
    run = rlhf(tiny_model_dir, tmp_path, "--rlhf_type", "grpo", "--dataset", "swiftray/arithmetic:easy_train#8",
               "--reward_model", rm, "--beta", "0", "--max_steps", 1, "--per_device_train_batch_size", 4,
               "--gradient_accumulation_steps", 1, "--num_generations", 4, "--max_completion_length", 8,
               "--save_steps", 1)
    (record,) = [r for r in read_log(run) if "train/reward" in r]
    assert "train/rewards/checkpoint-2/mean" in record  # its own column, named after the folder
    assert record["train/reward"] == pytest.approx(record["train/rewards/checkpoint-2/mean"], abs=1e-5)
    assert not any(k.startswith("train/rewards/accuracy") for k in record)  # no rule reward ran


BAD_PAIR = {"messages": [{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}]}
GOOD_PAIR = {**BAD_PAIR, "rejected_response": "5"}
BAD_KTO = {**BAD_PAIR, "label": "maybe"}


@pytest.mark.parametrize(("algo", "rows", "expected"), [
    ("dpo", [GOOD_PAIR, BAD_PAIR], "line 2, field 'rejected_response': missing the rejected side"),
    ("kto", [{**BAD_PAIR, "label": True}, BAD_KTO], "line 2, field 'label': got 'maybe'; expected a boolean"),
])
def test_a_bad_preference_row_fails_in_one_line_naming_file_line_and_field(tiny_model_dir, tmp_path, algo, rows,
                                                                           expected):
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # the data is read before any cluster
    proc = subprocess.run([sys.executable, "-m", "swiftray", "rlhf", "--rlhf_type", algo, "--model", str(tiny_model_dir),
                           "--dataset", str(path), "--strict", "true", "--output_dir", str(tmp_path / "out")],
                          capture_output=True, text=True, cwd=REPO, timeout=300, env=env)
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if "error" in line.lower()]
    assert len(errors) == 1 and errors[0].startswith(f"swiftray rlhf: error: {path} {expected}")
    assert "Traceback" not in proc.stderr and not (tmp_path / "out").exists()
