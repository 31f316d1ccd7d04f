"""One GRPO contender, run in its own process: `python benchmarks/grpo_bench.py --contender trl ...`.

Every contender starts from the same SFT'd checkpoint, takes the prompts of the same file in the same
order, and runs K steps of 8 completions (one prompt x num_generations 8), 64 new tokens at
temperature 1, beta 0.04, loss_type grpo, constant LR, rewards `accuracy` + `format` (swiftray's
own functions, handed to TRL as plain callables):

    swiftray        `swiftray rlhf --rlhf_type grpo` (this process is its driver)
    swiftray_async  the same with --async_generate true (generation overlaps training)
    trl             TRL's GRPOTrainer, fp32, no gradient checkpointing, model.generate
    floor           the sequential floor: the same step's compute in one process, no framework:
                    model.generate, reference forward, forward/backward, AdamW

Prints one `RESULT {...}` line: step end times, per-step mean reward, and the floor's phase times.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from benchmarks.harness import emit, read_jsonl, step_end_recorder  # noqa: E402


def step_summary(ends: list[float], rewards: list[float], start: float) -> dict[str, Any]:
    """Steady-state seconds per step: from the end of step 1 to the end of step K, over K - 1."""
    k = len(ends)
    half = rewards[len(rewards) // 2:]
    return {"s_per_step": (ends[-1] - ends[0]) / (k - 1) if k > 1 else float("nan"),
            "step_s": [b - a for a, b in zip(ends, ends[1:])], "rewards": rewards,
            "reward_mean": sum(rewards) / len(rewards) if rewards else None,
            "reward_last_half": sum(half) / len(half) if half else None,
            "startup_s": ends[0] - start if ends else None, "steps": k}


def reward_functions() -> list[Any]:
    """swiftray's `accuracy` and `format`, as functions TRL calls with the dataset's columns."""
    from swiftray.rewards.builtin import Format, MathAccuracy

    acc, fmt = MathAccuracy(), Format()

    def accuracy(completions: list[str], solution: list[str], **kwargs: Any) -> list[float]:
        return acc(completions, solution)

    def format(completions: list[str], **kwargs: Any) -> list[float]:  # noqa: A001 (the reward's name)
        return fmt(completions)

    return [accuracy, format]


# --- swiftray ----------------------------------------------------------------------------------------

def run_swiftray(opts: argparse.Namespace, async_generate: bool) -> dict[str, Any]:
    from swiftray.cli import main as swiftray_main

    before: list[str] = []
    if opts.before:
        # swiftray as it was before this benchmark's fixes: model.generate in the rollout, weight sync
        # through the object store, every completion's prompt computed again (fused AdamW stays). The
        # thread split is the run plan's now in both contenders.
        os.environ["SWIFTRAY_STATIC_DECODE"] = "0"  # inherited by the actors Ray starts
        os.environ["SWIFTRAY_SHARE_PROMPTS"] = "0"
        before = ["--weight_sync", "object_store"]
    from swiftray.tracking import Tracker

    ends: list[float] = []
    rewards: list[float] = []
    timings: list[dict[str, float]] = []
    advance, log = Tracker.advance, Tracker.log

    def timed_advance(self: Tracker, *a: Any, **k: Any) -> None:
        ends.append(time.perf_counter())
        advance(self, *a, **k)

    def logged(self: Tracker, step: int, metrics: dict, **k: Any) -> None:
        if k.get("prefix") == "train/" and "reward" in metrics:
            rewards.append(float(metrics["reward"]))
            timings.append({key: float(v) for key, v in metrics.items() if key.startswith("time/")})
        log(self, step, metrics, **k)

    Tracker.advance, Tracker.log = timed_advance, logged
    start = time.perf_counter()
    swiftray_main([
        "rlhf", "--rlhf_type", "grpo", "--model", opts.model, "--train_type", "full",
        "--dataset", str(opts.data), "--dataset_shuffle", "false", "--max_steps", str(opts.steps),
        "--per_device_train_batch_size", str(opts.batch), "--gradient_accumulation_steps", "1",
        "--num_generations", str(opts.num_generations), "--max_completion_length", str(opts.max_new_tokens),
        "--temperature", "1.0", "--learning_rate", str(opts.lr), "--lr_scheduler_type", "constant",
        "--beta", str(opts.beta), "--loss_type", "grpo", "--reward_funcs", "accuracy", "format",
        "--torch_dtype", "float32", "--gradient_checkpointing", "false", "--async_generate",
        str(async_generate).lower(), "--save_strategy", "no", "--eval_strategy", "no", "--report_to", "none",
        "--logging_steps", "1", "--eval_steps", str(10 * opts.steps), "--seed", "42",
        "--output_dir", str(opts.out), *before,
    ])
    out = step_summary(ends, rewards, start)
    out["stage_timings"] = timings
    return out


# --- TRL ---------------------------------------------------------------------------------------------

def prompt_texts(model: str, data: Path) -> list[dict[str, str]]:
    """Each row's prompt rendered by swiftray's template (so TRL tokenises exactly the same ids)."""
    from transformers import AutoTokenizer

    from swiftray.data.template import Template

    tokenizer = AutoTokenizer.from_pretrained(model)
    template = Template(tokenizer)
    rows = []
    for row in read_jsonl(data):
        ids = template.encode_prompt(row["messages"][:-1])
        rows.append({"prompt": tokenizer.decode(ids), "solution": row["solution"], "prompt_ids": ids})
    return rows


def run_trl(opts: argparse.Namespace) -> dict[str, Any]:
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import GRPOConfig, GRPOTrainer

    rows = prompt_texts(opts.model, opts.data)
    ds = Dataset.from_list([{"prompt": r["prompt"], "solution": r["solution"]} for r in rows])
    start = time.perf_counter()
    config = GRPOConfig(
        output_dir=str(opts.out), max_steps=opts.steps, per_device_train_batch_size=opts.batch,
        gradient_accumulation_steps=1, num_generations=opts.num_generations,
        max_completion_length=opts.max_new_tokens, temperature=1.0, learning_rate=opts.lr,
        lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.1, max_grad_norm=1.0, beta=opts.beta,
        loss_type="grpo", scale_rewards="group", bf16=False, fp16=False, gradient_checkpointing=False,
        use_cpu=True, logging_steps=1, save_strategy="no", report_to="none", seed=42, shuffle_dataset=False,
        dataloader_num_workers=0, disable_tqdm=True)
    model = AutoModelForCausalLM.from_pretrained(opts.model, dtype="float32", attn_implementation="sdpa")
    trainer = GRPOTrainer(model=model, reward_funcs=reward_functions(), args=config, train_dataset=ds,
                          processing_class=AutoTokenizer.from_pretrained(opts.model))
    ends: list[float] = []
    trainer.add_callback(step_end_recorder(ends))
    trainer.train()
    rewards = [float(h["reward"]) for h in trainer.state.log_history if "reward" in h]
    return step_summary(ends, rewards, start)


# --- the sequential floor ------------------------------------------------------------------------------

def run_floor(opts: argparse.Namespace) -> dict[str, Any]:
    """Generate, score, reference forward, forward/backward/AdamW: nothing else, one process."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from swiftray.algorithms.grpo_math import group_advantages
    from swiftray.experience import sequences_batch

    rows = prompt_texts(opts.model, opts.data)
    tokenizer = AutoTokenizer.from_pretrained(opts.model)
    accuracy, fmt = reward_functions()
    start = time.perf_counter()
    policy = AutoModelForCausalLM.from_pretrained(opts.model, dtype="float32", attn_implementation="sdpa")
    reference = copy.deepcopy(policy).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=opts.lr, weight_decay=0.1)
    stop = [tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.pad_token_id]
    g = opts.num_generations
    ends, rewards, phases = [], [], []
    for step in range(opts.steps):
        t0 = time.perf_counter()
        row = rows[step]
        prompt = torch.tensor([row["prompt_ids"]] * g)
        policy.eval()
        with torch.no_grad():
            out = policy.generate(input_ids=prompt, attention_mask=torch.ones_like(prompt), do_sample=True,
                                  temperature=1.0, top_k=0, top_p=1.0, max_new_tokens=opts.max_new_tokens,
                                  eos_token_id=stop, pad_token_id=tokenizer.pad_token_id)
        completions = []
        for seq in out[:, prompt.shape[1]:].tolist():
            cut = next((i + 1 for i, tok in enumerate(seq) if tok in stop), len(seq))
            completions.append(seq[:cut])
        t1 = time.perf_counter()
        texts = tokenizer.batch_decode(completions, skip_special_tokens=True)
        reward = torch.tensor(accuracy(texts, [row["solution"]] * g), dtype=torch.float32)
        reward += torch.tensor(fmt(texts), dtype=torch.float32)
        advantages = group_advantages(reward, g, "group").float()
        batch = sequences_batch([row["prompt_ids"]] * g, completions, tokenizer.pad_token_id)
        ids, mask = batch["input_ids"], batch["attention_mask"]
        loss_mask = (batch["labels"][:, 1:] != -100).float()
        t2 = time.perf_counter()
        with torch.no_grad():
            ref_lp = token_logprobs(reference(input_ids=ids, attention_mask=mask).logits, ids)
        t3 = time.perf_counter()
        policy.train()
        lp = token_logprobs(policy(input_ids=ids, attention_mask=mask).logits, ids)
        ratio = torch.exp(lp - lp.detach())  # one update per batch: the old policy is the current one
        kl = torch.exp(ref_lp - lp) - (ref_lp - lp) - 1
        per_token = -ratio * advantages[:, None] + opts.beta * kl
        loss = ((per_token * loss_mask).sum(1) / loss_mask.sum(1).clamp(min=1)).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(policy.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        ends.append(t4)
        rewards.append(float(reward.mean()))
        phases.append({"generate_s": t1 - t0, "score_s": t2 - t1, "reference_s": t3 - t2, "train_s": t4 - t3,
                       "prompt_len": len(row["prompt_ids"]), "completion_lens": [len(c) for c in completions],
                       "sequence_tokens": int(mask.sum())})
    out = step_summary(ends, rewards, start)
    out["phases"] = phases
    return out


def token_logprobs(logits: Any, ids: Any) -> Any:
    import torch

    return torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, ids[:, 1:, None]).squeeze(-1)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--contender", choices=("swiftray", "swiftray_async", "trl", "floor"), required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", type=Path, required=True)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--batch", type=int, default=8, help="completions per step")
    p.add_argument("--num_generations", type=int, default=8)
    p.add_argument("--max_new_tokens", type=int, default=64)
    p.add_argument("--lr", type=float, default=1e-5)
    p.add_argument("--beta", type=float, default=0.04)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--before", type=int, default=0, help="swiftray without the benchmark's fixes")
    opts = p.parse_args()
    import torch

    if not opts.contender.startswith("swiftray"):
        torch.set_num_threads(opts.threads)
    runners = {"swiftray": lambda: run_swiftray(opts, False), "swiftray_async": lambda: run_swiftray(opts, True),
               "trl": lambda: run_trl(opts), "floor": lambda: run_floor(opts)}
    result = runners[opts.contender]()
    result.update(contender=opts.contender + ("_before" if opts.before else ""), threads=torch.get_num_threads())
    emit(result)


if __name__ == "__main__":
    main()
