"""Self-cognition for real: after `swiftray sft` on swift/self-cognition mixed with arithmetic,
`swiftray infer` answers "who are you?" and rephrasings it never saw as swift-robot by swift.

A full-parameter run: LoRA on a randomly initialised base (tied, near-zero embeddings) learns the
answer only after many more steps; test_infer_export covers the --adapters path.
"""

from __future__ import annotations

import json

from _ray import ray_cluster  # noqa: F401
from _sft import run_sft

from swiftray import checkpoint as ckpt
from swiftray.arguments import InferArguments
from swiftray.cli_parser import parse_args
from swiftray.data.builtin import SELF_COGNITION_HELDOUT, load_builtin
from swiftray.infer import run_infer

MATH_QUESTION = "A shop had 62 flowers. It sold 55 of them. How many flowers does the shop have left?"


def test_model_learns_its_name_and_author(ray_cluster, tiny_model_dir, tmp_path):  # noqa: F811
    trained_queries = {row["messages"][0]["content"] for row in load_builtin(
        "swift/self-cognition", model_name=["swift-robot"], model_author=["swift"])}
    assert not trained_queries & set(SELF_COGNITION_HELDOUT)

    run = run_sft(tiny_model_dir, tmp_path / "out", "--train_type", "full", "--learning_rate", "2e-3",
                  "--dataset", "swift/self-cognition#400", "swiftray/arithmetic#100",
                  "--model_name", "swift-robot", "--model_author", "swift",
                  "--max_steps", 150, "--per_device_train_batch_size", 8, "--gradient_accumulation_steps", 1,
                  "--warmup_ratio", "0.05", "--save_steps", 1000, "--save_only_model", "true",
                  "--report_to", "none", "--logging_steps", 50)
    last = ckpt.latest_checkpoint(run)
    assert last.name == "checkpoint-150"

    questions = ["who are you?", *SELF_COGNITION_HELDOUT, MATH_QUESTION]
    val = tmp_path / "questions.jsonl"
    val.write_text("".join(json.dumps({"messages": [{"role": "user", "content": q}]}) + "\n" for q in questions))
    results = run_infer(parse_args(InferArguments, ["--model", last, "--val_dataset", val, "--temperature", "0",
                                                    "--max_new_tokens", 48, "--result_path", tmp_path / "r.jsonl"]))

    answers = {rec["messages"][0]["content"]: rec["response"] for rec in results}
    math_answer = answers.pop(MATH_QUESTION)
    # Every identity question gets the name; those that ask who made it (and "who are you?") the author too.
    wrong = {q: a for q, a in answers.items() if "swift-robot" not in a}
    asks_author = [q for q in answers if q == "who are you?" or any(w in q for w in ("built", "behind", "made"))]
    assert len(asks_author) == 4
    wrong.update({q: answers[q] for q in asks_author if "swift" not in answers[q].replace("swift-robot", "")})
    assert not wrong, wrong
    # It did not learn one answer for everything: a math question still gets a math-style answer.
    assert "swift-robot" not in math_answer and "<answer>" in math_answer
