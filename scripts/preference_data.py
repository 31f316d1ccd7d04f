"""The preference runs' training pairs (scripts/preference_learning.py): the built-in pairs and their
shuffled-label control, the SFT model's own right/wrong samples, and minimal pairs that each break one
checkable thing in a worked answer (the `rm_lines` and `rm_arith` reward models' data)."""

from __future__ import annotations

import argparse
import json
import os
import random
from collections.abc import Iterable
from pathlib import Path

LINE_PAIRS_PER_PROBLEM = 12


def write_jsonl(rows: list[dict], path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    return str(path)


def swapped_at_random(rows: list[dict], seed: int) -> list[dict]:
    """The control's pairs: each pair's sides swapped with probability 1/2 (its labels carry no information)."""
    rng = random.Random(seed)
    out = []
    for row in rows:
        good, bad = row["messages"][-1]["content"], row["rejected_response"]
        if rng.random() < 0.5:
            good, bad = bad, good
        out.append({"messages": row["messages"][:-1] + [{"role": "assistant", "content": good}],
                    "rejected_response": bad})
    return out


def pair_data(work: Path, seed: int, shuffled: bool, kto: bool) -> str:
    """`--dataset` of the built-in training pairs (or their KTO view); shuffled: the control's."""
    from swiftray.data.builtin.arithmetic_pairs import arithmetic_pairs_split

    if not shuffled:
        return "swiftray/arithmetic-pairs:easy_train" + ("_kto" if kto else "")
    rows = swapped_at_random(arithmetic_pairs_split("easy_train"), seed)
    if kto:
        rows = [{"messages": r["messages"][:-1] + [{"role": "assistant", "content": text}], "label": label}
                for r in rows for text, label in ((r["messages"][-1]["content"], True), (r["rejected_response"], False))]
    return write_jsonl(rows, work / f"shuffled_pairs{'_kto' if kto else ''}.jsonl")


def policy_pairs(model_dir: Path, dataset: str, path: Path, samples: int, seed: int) -> str:
    """Pairs from the model's own samples, labelled by the accuracy rule: of `samples` completions per prompt
    (temperature 1, as GRPO samples them), each right one is paired with a different wrong one (chosen,
    rejected). A reward model trained on these sees the policy's own mistakes, not the built-in pairs'
    planted ones, and is judged on the same kind of pair from held-out prompts."""
    if path.exists():
        return str(path)
    import torch

    from swiftray.data.loader import load_datasets
    from swiftray.data.template import Template
    from swiftray.models.generation import HFEngine, SamplingParams
    from swiftray.models.inference import load_inference_model
    from swiftray.rewards import build_reward_funcs

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = list(load_datasets([dataset], shuffle=False))
    model, tokenizer = load_inference_model(str(model_dir))
    template = Template(tokenizer)
    outs = HFEngine(model, tokenizer, batch_size=64).generate(
        [template.encode_prompt(r["messages"][:-1]) for r in rows],
        SamplingParams(max_new_tokens=48, temperature=1.0, n=samples, seed=seed))
    texts = [tokenizer.decode(o.token_ids, skip_special_tokens=True) for o in outs]
    right, _ = build_reward_funcs(["accuracy"]).score(
        texts, {"solution": [r["solution"] for r in rows for _ in range(samples)]})
    pairs = []
    for i, row in enumerate(rows):
        group = zip(texts[i * samples:(i + 1) * samples], right["accuracy"][i * samples:(i + 1) * samples])
        pairs += [{"messages": row["messages"][:-1] + [{"role": "assistant", "content": g}], "rejected_response": b}
                  for g, b in right_against_wrong(group)]
    return write_jsonl(pairs, path)


def right_against_wrong(samples: Iterable[tuple[str, float]]) -> list[tuple[str, str]]:
    """(right, wrong) pairs from one prompt's (completion, accuracy reward) samples: each distinct right
    completion against a different distinct wrong one, in sampling order; none if either side is missing."""
    samples = list(samples)
    right = dict.fromkeys(text for text, reward in samples if reward == 1.0)
    wrong = dict.fromkeys(text for text, reward in samples if reward != 1.0)
    return list(zip(right, wrong))


BREAKS = ("slip", "slip_prop", "answer", "copy_first", "copy_operand")
# rm_arith: the break no consistency check finds, a line's result off with everything after following from it
# (what GRPO with rm_lines learnt to write), three times in five
ARITH_BREAKS = ("slip", "slip_prop", "slip_prop", "slip_prop", "answer")


def broken_workings(row: dict, rng: random.Random, k: int, breaks: tuple[str, ...] = BREAKS) -> tuple[str, list[str]]:
    """(the right answer, up to k wrong ones): each breaks one thing a reader can check in the working: a
    line's result (later lines following it or not), the answer against the last line, or a number copied
    from the question (the first value or an operand)."""
    from swiftray.data.builtin.arithmetic_pairs import _parse_steps, _work, render_answer

    steps = _parse_steps(row["messages"][-1]["content"])
    first, ops = steps[0][0], [(op, b) for _a, op, b in steps]
    good_lines, good = _work(first, ops)
    right = render_answer(good_lines, good)
    wrong: list[str] = []
    for _ in range(k * 3):
        kind = rng.choice(breaks)
        delta = rng.choice([-3, -2, -1, 1, 2, 3, 10, -10])
        if kind in ("slip", "slip_prop"):
            lines, value = _work(first, ops, {rng.randrange(len(ops)): delta}, propagate=kind == "slip_prop")
            answer = value if kind == "slip_prop" else good
        elif kind == "answer":
            lines, answer = good_lines, good + delta
        elif kind == "copy_first":
            lines, answer = _work(first + delta, ops)
        else:
            i = rng.randrange(len(ops))
            changed = list(ops)
            changed[i] = (ops[i][0], ops[i][1] + delta)
            lines, answer = _work(first, changed)
        if answer < 0 or any(int(n) < 0 for line in lines for n in line.split()[::2]):
            continue
        text = render_answer(lines, answer)
        if text != right and text not in wrong:
            wrong.append(text)
        if len(wrong) == k:
            break
    return right, wrong


def line_check_pairs(work: Path, seed: int, shuffled: bool, breaks: tuple[str, ...] = BREAKS) -> str:
    """`--dataset` of minimal pairs on the training problems: the right working against the same working
    with one checkable thing broken (LINE_PAIRS_PER_PROBLEM per problem). The SFT model's own wrong answers
    mostly show such a break (86% have a wrong line on seed 42), so a reward model that learns to find one
    would rank the policy's samples (the ones trained here reached 59%: docs/preference_runs.md).
    shuffled: the control's."""
    from swiftray.data.builtin.arithmetic import arithmetic_split

    name = "line_pairs" if breaks == BREAKS else "arith_pairs"
    path = work / f"{name}{'_shuffled' if shuffled else ''}.jsonl"
    if path.exists():
        return str(path)
    rng = random.Random(seed)
    rows = []
    for problem in arithmetic_split("easy_train"):
        right, wrong = broken_workings(problem, rng, LINE_PAIRS_PER_PROBLEM, breaks)
        rows += [{"messages": problem["messages"][:-1] + [{"role": "assistant", "content": right}],
                  "rejected_response": text} for text in wrong]
    rng.shuffle(rows)
    return write_jsonl(swapped_at_random(rows, seed) if shuffled else rows, path)


SAMPLED_PAIRS = 48_000  # rm_slips: 3,000 steps of 16, each pair drawn afresh


def sampled_break_pairs(work: Path, seed: int, shuffled: bool, n: int = SAMPLED_PAIRS) -> str:
    """`--dataset` of n minimal pairs, each a random training problem's right working against one random
    ARITH_BREAKS break of it, drawn with replacement. Unlike line_check_pairs' fixed 12 per problem, a
    reward model trained on these rarely sees the same pair twice, so it cannot pass by recalling each
    problem's answer; it has to check the lines (docs/preference_runs.md). shuffled: the control's."""
    from swiftray.data.builtin.arithmetic import arithmetic_split

    path = work / f"sampled_breaks_{n}{'_shuffled' if shuffled else ''}.jsonl"
    if path.exists():
        return str(path)
    rng, problems, rows = random.Random(seed), arithmetic_split("easy_train"), []
    while len(rows) < n:
        problem = rng.choice(problems)
        right, wrong = broken_workings(problem, rng, 1, ARITH_BREAKS)
        rows += [{"messages": problem["messages"][:-1] + [{"role": "assistant", "content": right}],
                  "rejected_response": text} for text in wrong]
    return write_jsonl(swapped_at_random(rows, seed) if shuffled else rows, path)


def training_pairs(on_policy: bool, sft: Path, work: Path, seed: int, shuffled: bool, opts: argparse.Namespace,
                   kto: bool = False) -> str:
    """`--dataset` of a run's training pairs: the built-in ones, or (on_policy) the SFT model's own samples
    on the training prompts; shuffled: the control's."""
    if not on_policy:
        return pair_data(work, seed, shuffled, kto)
    path = Path(policy_pairs(sft, "swiftray/arithmetic:easy_train",
                             work / f"policy_pairs_train_x{opts.policy_samples}.jsonl", opts.policy_samples, seed))
    if not shuffled:
        return str(path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    return write_jsonl(swapped_at_random(rows, seed), path.with_name(path.stem + "_shuffled.jsonl"))
