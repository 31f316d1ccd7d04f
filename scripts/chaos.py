"""A chaos run: GRPO on a simulated multi-node cluster that kills actors and nodes and adds nodes at
random steps, beside a fault-free run with the same seed.

    python scripts/chaos.py                       # 12 steps, 12 faults, seed 0, a tiny model built here
    python scripts/chaos.py --steps 20 --faults 16 --seed 3 --model tiny-model

Prints the faults injected and recovered, steps lost, prompts lost or doubled (the ledger against the
fault-free run's), and both runs' rewards and losses. Faults (swiftray/chaos.py): SIGKILL a rollout
engine, the reward actor, the reference actor or a policy rank mid-step; remove the node that holds the
most engines; add a node (its engine joins the pool). Every removal follows an addition, so that the
cluster keeps room for what the removed node held. Recorded output: docs/chaos.md.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from swiftray.chaos import Fault, SimCluster, run_rl  # noqa: E402
from swiftray.controller import ledger  # noqa: E402

KILLS = ("kill_rollout", "kill_reward", "kill_reference", "kill_policy")
# The ledger events that show each fault handled.
RECOVERY = {"kill_rollout": {("actor_replaced", "rollout"), ("engine_dropped", "rollout")},
            "kill_reward": {("actor_replaced", "reward")}, "kill_reference": {("actor_replaced", "reference")},
            "kill_policy": {("policy_restarted", "policy")},
            "remove_node": {("actor_replaced", "rollout"), ("engine_dropped", "rollout")},
            "add_node": {("engine_added", "rollout")}}

PLUGIN = '''
from swiftray.rewards import register_reward


@register_reward("digits_and_length")
def digits_and_length(completions, **kwargs):
    """A reward that the tiny model can move: digits in the completion, and a little length."""
    return [sum(ch.isdigit() for ch in c) / 4 + 0.01 * len(c) for c in completions]
'''


def schedule(steps: int, count: int, seed: int) -> list[Fault]:
    """`count` faults at random steps: kills of any role, and add/remove node pairs (an addition first)."""
    rng = random.Random(seed)
    faults: list[Fault] = []
    while len(faults) < count:
        if rng.random() < 0.3 and len(faults) + 2 <= count and steps >= 3:
            add = rng.randint(1, steps - 1)
            faults += [Fault(add, "add_node"), Fault(rng.randint(add + 1, steps), "remove_node")]
        else:
            faults.append(Fault(rng.randint(1, steps), rng.choice(KILLS)))
    order = ("add_node", "kill_rollout", "kill_reward", "remove_node", "kill_reference", "kill_policy")
    return sorted(faults, key=lambda f: (f.step, order.index(f.kind)))


def flags(model: str, plugin: Path, steps: int, seed: int) -> list[str]:
    return ["--rlhf_type", "grpo", "--model", model, "--dataset", "swiftray/arithmetic#256", "--train_type", "full",
            "--max_steps", str(steps), "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",
            "--num_generations", "4", "--max_completion_length", "12", "--logging_steps", "1", "--report_to", "none",
            "--save_strategy", "steps", "--save_steps", "4", "--memory_checkpoint_steps", "2", "--beta", "0.04",
            "--learning_rate", "2e-3", "--lr_scheduler_type", "constant", "--reward_funcs", "digits_and_length",
            "--external_plugins", str(plugin), "--num_infer_workers", "2", "--max_infer_workers", "4",
            "--rollout_batch_size", "1", "--num_cpus_per_worker", "2", "--eval_strategy", "no", "--seed", str(seed),
            "--max_restarts", "50"]


def recovered(fault: dict, lines: dict[int, dict]) -> bool:
    events = {(f["kind"], f["role"]) for f in lines.get(fault["step"], {}).get("faults", [])}
    if fault.get("skipped"):
        return True  # nothing to recover: no engine on a removable node, or the actor already gone with its node
    return bool(events & RECOVERY[fault["kind"]])


def report(clean: dict, chaos: dict, steps: int) -> str:
    path = Path(chaos["run_dir"]) / ledger.LEDGER
    lines = ledger.standing(path)
    expected = {line["step"]: line["prompts"] for line in clean["ledger"]}
    problems = ledger.check(path, expected, last_step=steps)
    lost = sum(1 for s in range(1, steps + 1) if s not in lines)
    doubled = sum(n - 1 for line in lines.values() for n in Counter(line["prompts"]).values() if n > 1)
    missing = sum(sum((Counter(expected[s]) - Counter(lines[s]["prompts"] if s in lines else [])).values())
                  for s in expected)
    injected = chaos["injected"]
    kinds = Counter(f["kind"] + (" (skipped)" if f.get("skipped") else "") for f in injected)
    ok = [f for f in injected if recovered(f, lines)]
    events = Counter(f["kind"] for line in lines.values() for f in line["faults"])
    reward = lambda run: [line["train/reward"] for line in run["train"]]  # noqa: E731
    loss_gap = max(abs(a["train/loss"] - b["train/loss"]) for a, b in zip(chaos["train"], clean["train"]))
    tail = min(3, steps)
    out = [
        f"faults injected:   {len(injected)} ({', '.join(f'{k} {n}' for k, n in sorted(kinds.items()))})",
        f"faults recovered:  {len(ok)} of {len(injected)}; recovery events: "
        + ", ".join(f"{k} {n}" for k, n in sorted(events.items())),
        f"steps lost:        {lost} of {steps} (replayed after a policy restart: "
        f"{sum(1 for line in ledger.read(path) if line['replay'])})",
        f"prompts lost:      {missing}",
        f"prompts doubled:   {doubled}",
        f"ledger problems:   {problems or 'none'}",
        f"reward, last {tail} steps: chaos {statistics.fmean(reward(chaos)[-tail:]):.4f}, "
        f"fault-free {statistics.fmean(reward(clean)[-tail:]):.4f}",
        f"reward per step, chaos:      {' '.join(f'{r:.3f}' for r in reward(chaos))}",
        f"reward per step, fault-free: {' '.join(f'{r:.3f}' for r in reward(clean))}",
        f"largest loss difference from the fault-free run: {loss_gap:.2e}",
        f"wall time: chaos {chaos['seconds']:.0f}s, fault-free {clean['seconds']:.0f}s",
    ]
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--faults", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="a model folder; default: a tiny model built here")
    parser.add_argument("--json", help="also write both runs' results here")
    opts = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="swiftray-chaos-"))
    model = opts.model
    if model is None:
        from swiftray.models.tiny import make_tiny_model

        model = str(make_tiny_model(work / "tiny-model"))
    plugin = work / "chaos_reward.py"
    plugin.write_text(PLUGIN)
    faults = schedule(opts.steps, opts.faults, opts.seed)
    print("fault plan:", ", ".join(f"step {f.step} {f.kind}" for f in faults), flush=True)
    cluster = SimCluster([0, 2, 2])
    try:
        clean = run_rl(work / "fault-free", flags(model, plugin, opts.steps, opts.seed))
        chaos = run_rl(work / "chaos", flags(model, plugin, opts.steps, opts.seed), faults, cluster, add_cpus=2)
    finally:
        cluster.shutdown()
    print(report(clean, chaos, opts.steps))
    if chaos["not_injected"]:
        print("not injected:", chaos["not_injected"])
    if opts.json:
        Path(opts.json).write_text(json.dumps({"clean": clean, "chaos": chaos}, default=str))


if __name__ == "__main__":
    main()
