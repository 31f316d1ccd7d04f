"""Runs on a simulated 3-node cluster (ray.cluster_utils.Cluster), in a process of their own so that the
test session's Ray stays as it is: `python tests/cluster_scenarios.py OUT.json MODEL_DIR [names...]`.

    collective  policy rank 0 on one node, an engine on another: log-probs after a broadcast sync
    baseline    GRPO, 3 steps, no fault
    actors      the same, SIGKILL a rollout engine (step 1), the reward actor and, as step 2 trains, the
                policy rank (back to its memory snapshot of step 1), the reference actor (step 3)
    hang        a reward function that hangs on about one prompt in four, --reward_timeout 3
    elastic     the same as baseline, a node joins before step 2, the engines' node is removed at step 3

Writes {name: result} (chaos.run_rl's results) to OUT.json; tests/test_cluster_faults.py asserts on it.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

PLUGIN = '''
import time
import zlib

from swiftray.rewards import register_reward


@register_reward("varied")
def varied(completions, **kwargs):
    """Different within every group of 4: the position in the group, plus a little length."""
    return [float(i % 4) + 0.01 * len(c) for i, c in enumerate(completions)]


@register_reward("hangs_on_prompt")
def hangs_on_prompt(completions, messages, **kwargs):
    """Hangs (for an hour) on the completions of about one prompt in four (by a hash of its text)."""
    out = []
    for c, m in zip(completions, messages):
        if zlib.crc32(m[-1]["content"].encode()) % 4 == 0:
            time.sleep(3600)
        out.append(float(len(c) % 3))
    return out
'''


def flags(model: str, plugin: Path, *extra: str, steps: int = 3) -> list[str]:
    return ["--rlhf_type", "grpo", "--model", model, "--dataset", "swiftray/arithmetic#64", "--train_type", "full",
            "--max_steps", str(steps), "--per_device_train_batch_size", "16", "--gradient_accumulation_steps", "1",
            "--num_generations", "4", "--max_completion_length", "8", "--logging_steps", "1", "--report_to", "none",
            "--save_strategy", "no", "--beta", "0.04", "--learning_rate", "1e-3", "--lr_scheduler_type", "constant",
            "--reward_funcs", "varied", "--external_plugins", str(plugin), "--num_infer_workers", "2",
            "--max_infer_workers", "3", "--rollout_batch_size", "1", "--num_cpus_per_worker", "2",
            "--eval_strategy", "no", "--seed", "7", *extra]


def collective_logprobs(model: str) -> dict:
    """Policy rank 0 on one node, an hf engine on another; the policy trains a step, the weights go by
    broadcast; the engine's log-probs of its own samples against the policy's."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from swiftray.actors.group import ActorGroup
    from swiftray.actors.policy import PolicyActor
    from swiftray.actors.rollout import RolloutActor
    from swiftray.algorithms.sft import SFT
    from swiftray.experience import sequences_batch, tokens_to_completion_values
    from swiftray.models.generation import SamplingParams

    policy = ActorGroup(PolicyActor, 1, num_cpus_per_worker=0.5, name="collective-policy")
    policy_node = ray.get(policy.actors[0].node_id.remote())
    other = next(n["NodeID"] for n in ray.nodes()
                 if n["Alive"] and n["NodeID"] != policy_node and n["Resources"].get("CPU"))
    engine = ray.remote(RolloutActor).options(
        num_cpus=0.25, scheduling_strategy=NodeAffinitySchedulingStrategy(other, soft=False)).remote()
    ray.get(engine.init_distributed.remote(1, 1, "", 0, None, 1))
    config = {"model_dir": model, "torch_dtype": "float32", "train_type": "full", "learning_rate": 5e-2,
              "lr_scheduler_type": "constant", "total_steps": 10}
    ray.get(policy.call_all("setup", config) + [engine.setup.remote({"model_dir": model, "torch_dtype": "float32"})])
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    prompts = [{"prompt_ids": tok.encode(t)} for t in ("1 + 1 =", "hello")]
    batch = ray.get(engine.generate.remote(prompts, SamplingParams(max_new_tokens=8, n=2), 0))
    rows = sequences_batch(batch.prompt_ids, batch.completion_ids, tok.pad_token_id)
    ray.get(policy.call_all("train_step", [rows], SFT().loss))  # weights move: a missed sync would show

    def gap() -> float:
        lp = ray.get(policy.actors[0].compute_logprobs.remote(rows))
        ours = tokens_to_completion_values(lp, [len(p) for p in batch.prompt_ids], [len(c) for c in batch.completion_ids])
        theirs = ray.get(engine.sequence_logprobs.remote(batch.prompt_ids, batch.completion_ids))
        return max(abs(a - b) for x, y in zip(ours, theirs) for a, b in zip(x, y))

    before = gap()
    addr, port = ray.get(policy.actors[0].get_master_address.remote())
    ray.get([policy.actors[0].join_weight_group.remote(addr, port, 2, "gloo", 1),
             engine.join_weight_group.remote(addr, port, 1, 2, "gloo", 1)])
    t = time.time()
    sent, received = ray.get([policy.actors[0].broadcast_weights.remote(5), engine.receive_weights.remote()])
    seconds = time.time() - t
    out = {"gap_before": before, "gap_after": gap(), "version": ray.get(engine.get_version.remote()),
           "bytes": sent, "tensors": received, "seconds": seconds,
           "nodes": [policy_node, other]}
    ray.kill(engine)
    policy.shutdown()
    return out


def main() -> None:
    out_path, model = Path(sys.argv[1]), sys.argv[2]
    names = sys.argv[3:] or ["collective", "baseline", "actors", "hang", "elastic"]
    from swiftray.chaos import Fault, SimCluster, run_rl

    work = out_path.parent / "runs"
    work.mkdir(parents=True, exist_ok=True)
    plugin = work / "scenario_rewards.py"
    plugin.write_text(PLUGIN)
    cluster = SimCluster([0, 2, 2])
    results = {}
    scenarios = {
        "baseline": lambda: run_rl(work / "baseline", flags(model, plugin)),
        "actors": lambda: run_rl(work / "actors", flags(model, plugin, "--memory_checkpoint_steps", "1"), [
            Fault(1, "kill_rollout"), Fault(2, "kill_reward"), Fault(2, "kill_policy"), Fault(3, "kill_reference")],
            cluster),
        "hang": lambda: run_rl(work / "hang", flags(model, plugin, "--reward_funcs", "hangs_on_prompt",
                                                    "--reward_timeout", "3", steps=2), [], cluster),
        "elastic": lambda: run_rl(work / "elastic", flags(model, plugin), [Fault(2, "add_node"),
                                                                          Fault(3, "remove_node")], cluster),
    }
    try:
        for name in names:
            start = time.time()
            try:
                results[name] = collective_logprobs(model) if name == "collective" else scenarios[name]()
            except Exception:  # noqa: BLE001 - reported to the test, which fails naming it
                results[name] = {"error": traceback.format_exc()}
            results[name]["wall_s"] = time.time() - start
            out_path.write_text(json.dumps(results, default=str))
    finally:
        cluster.shutdown()


if __name__ == "__main__":
    main()
