"""Plant one bug at a time in a scratch copy of the repository and check that the tests catch it.

    python scripts/mutations.py            # every mutation; prints caught / missed and the time taken
    python scripts/mutations.py --list     # one mutation a line: name, file, change
    python scripts/mutations.py --only NAME [--only NAME2]

Each mutation is a one-line change a real bug would make (a wrong sign, a setting that no longer
reaches its role, a skipped call), the file it is in, and the tests that should catch it. A mutation
is caught when those tests fail with it applied (and they pass without it: the script checks that
first, once per test selection). The last full run is recorded in docs/mutations.md.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


M = Mutation
MUTATIONS = [
    # --- GRPO maths
    M("advantage_without_group_mean", "swiftray/algorithms/grpo_math.py",
      "advantages = rewards - grouped.mean(dim=1).repeat_interleave(num_generations)", "advantages = rewards.clone()",
      ("tests/test_grpo_math.py",)),
    M("advantage_biased_std", "swiftray/algorithms/grpo_math.py",
      "std = grouped.std(dim=1).repeat_interleave(num_generations)",
      "std = grouped.std(dim=1, correction=0).repeat_interleave(num_generations)", ("tests/test_grpo_math.py",)),
    M("clip_low_uses_epsilon_high", "swiftray/algorithms/grpo_math.py",
      "clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high)",
      "clipped = torch.clamp(ratio, 1.0 - eps_high, 1.0 + eps_high)", ("tests/test_grpo_math.py",)),
    M("k3_kl_sign", "swiftray/algorithms/grpo_math.py", "torch.exp(delta) - delta - 1.0",
      "torch.exp(delta) + delta - 1.0", ("tests/test_grpo_math.py",)),
    M("dr_grpo_normaliser", "swiftray/algorithms/grpo_math.py",
      "loss = masked.sum() / (num_sequences * max_completion_length)", "loss = masked.sum() / num_sequences",
      ("tests/test_grpo_math.py",)),
    M("grpo_sequence_mean_over_padding", "swiftray/algorithms/grpo_math.py",
      "per_sequence = masked.sum(-1) / mask_f.sum(-1).clamp(min=1.0)",
      "per_sequence = masked.sum(-1) / mask_f.shape[-1]", ("tests/test_grpo_math.py",)),
    M("dynamic_sample_keeps_flat_groups", "swiftray/algorithms/grpo_math.py",
      "varied = grouped.amax(dim=1) != grouped.amin(dim=1)", "varied = grouped.amax(dim=1) == grouped.amin(dim=1)",
      ("tests/test_grpo_math.py",)),
    M("overlong_mask_inverted", "swiftray/algorithms/grpo_math.py", "keep = ~completion_truncated.bool()",
      "keep = completion_truncated.bool()", ("tests/test_grpo_math.py",)),
    # --- the four paths issue 16 found unguarded
    M("grpo_loss_epsilon_for_epsilon_high", "swiftray/algorithms/grpo.py",
      "epsilon=self.epsilon, epsilon_high=self.epsilon_high, beta",
      "epsilon=self.epsilon, epsilon_high=self.epsilon, beta", ("tests/test_plumbing.py",)),
    M("dapo_epsilon_high_default_lost", "swiftray/algorithms/grpo.py", "algo.epsilon_high = 0.28",
      "algo.epsilon_high = args.epsilon", ("tests/test_plumbing.py",)),
    M("reward_completion_ids_from_prompts", "swiftray/actors/reward.py",
      'extra = {"completion_ids": batch.completion_ids,', 'extra = {"completion_ids": batch.prompt_ids,',
      ("tests/test_plumbing.py",)),
    M("scheduler_not_restored", "swiftray/actors/policy.py", 'self.scheduler.load_state_dict(meta["scheduler"])',
      "pass  # scheduler left at its start", ("tests/test_policy_backends.py::test_two_ranks_match_reference_and_resume_exactly",)),
    # --- the GRPO algorithm and its batch
    M("overlong_filter_ignored", "swiftray/algorithms/grpo.py",
      "loss_on = [not t for t in batch.truncated] if self.overlong_filter else None", "loss_on = None",
      ("tests/test_rl_loop.py::test_reference_grpo_command_runs_on_cpu",)),
    M("bnpo_not_divided_by_micro_batches", "swiftray/algorithms/grpo.py",
      'loss = loss / int(batch["num_micro_batches_global"])', "loss = loss",
      ("tests/test_grpo_math.py", "tests/test_experience.py")),
    M("ref_logprobs_shifted", "swiftray/experience.py", "out[i, plen - 1:plen - 1 + len(v)]",
      "out[i, plen:plen + len(v)]", ("tests/test_experience.py",)),
    M("reward_prompts_not_passed", "swiftray/actors/reward.py", 'extra["prompts"] = batch.columns["messages"]',
      "pass", ("tests/test_plumbing.py",)),
    # --- the policy's training step
    M("sft_loss_normalised_per_rank", "swiftray/algorithms/sft.py",
      "loss = -(token_logprobs * mask).sum() / max(1, num_tokens_global)",
      "loss = -(token_logprobs * mask).sum() / max(1, int(mask.sum()))",
      ("tests/test_policy_backends.py::test_two_ranks_match_reference_and_resume_exactly",)),
    M("loss_not_scaled_by_world_size", "swiftray/actors/policy.py", "scaled = loss * self.world_size",
      "scaled = loss", ("tests/test_policy_backends.py::test_two_ranks_match_reference_and_resume_exactly",)),
    M("label_logits_off_by_one", "swiftray/models/label_logits.py", "return (args[0][:, :-1][mask], *args[1:])",
      "return (args[0][:, 1:][mask], *args[1:])", ("tests/test_label_logits.py",)),
    # --- data
    M("packed_positions_do_not_restart", "swiftray/data/packing.py",
      "position_ids[row, at : at + n] = torch.arange(n)", "position_ids[row, at : at + n] = torch.arange(at, at + n)",
      ("tests/test_packing.py",)),
    M("partial_step_filler_trains", "swiftray/data/batching.py",
      '"labels": [-100] * len(first["input_ids"])}', '"labels": first["labels"]}', ("tests/test_batching.py",)),
    # --- RL loop: versions, staleness, iterations, resume, colocation calls
    M("rollout_version_not_recorded", "swiftray/actors/rollout.py", "loaded += len(bucket)\n        self.version = version",
      "loaded += len(bucket)\n        self.version = 0",
      ("tests/test_rl_roles.py::test_rl_resume_reaches_the_same_losses_and_rewards",)),
    M("staleness_bound_off_by_one", "swiftray/controller/rl_tasks.py", "if staleness > algorithm.max_staleness:",
      "if staleness > algorithm.max_staleness + 1:",
      ("tests/test_rl_loop.py::test_staleness_beyond_the_algorithm_bound_raises",)),
    M("reused_batch_without_old_logprobs", "swiftray/controller/rl.py", "if (iterations > 1 or len(shards) > 1) and",
      "if len(shards) > 1 and", ("tests/test_rl_loop.py::test_each_batch_is_trained_num_iterations_times_against_old_logprobs",)),
    M("resume_forgets_prompt_order", "swiftray/controller/rl.py", 'sampler.load_state_dict(state["data"])\n            step = state["global_step"]',
      'step = state["global_step"]',
      ("tests/test_rl_roles.py::test_rl_resume_reaches_the_same_losses_and_rewards",)),
    M("colocated_engines_never_sleep", "swiftray/controller/rl.py", "            rl.sleep_engines()\n", "",
      ("tests/test_rl_roles.py::test_colocated_step_sleeps_wakes_offloads_and_onloads_in_order",)),
    M("policy_not_offloaded_after_sync", "swiftray/controller/rl.py",
      'rl.sync_weights(step)\n                rl.offload_policy()', "rl.sync_weights(step)",
      ("tests/test_rl_roles.py::test_colocated_step_sleeps_wakes_offloads_and_onloads_in_order",)),
    M("trained_role_skipped", "swiftray/controller/rl.py",
      '**{r.name: roles[r.name] for r in plan.roles_in("train")}}', "}",
      ("tests/test_rl_roles.py::test_a_plugin_algorithm_adds_a_trained_role_without_controller_changes",)),
    # --- the run plan: flags reaching roles, roles on the right resources, the schedule
    M("sleep_level_not_given_to_engines", "swiftray/plan.py", "            sleep_level=args.sleep_level,\n",
      "            sleep_level=0,\n",
      ("tests/test_plan.py::test_reference_grpo_command_colocates_one_engine_per_gpu_beside_its_rank",)),
    M("reference_not_given_the_run_dtype", "swiftray/plan.py", "RolePlan(spec.name, spec.actor, _with_dtype(config, dtype)",
      "RolePlan(spec.name, spec.actor, config",
      ("tests/test_plan.py::test_reference_grpo_command_colocates_one_engine_per_gpu_beside_its_rank",)),
    M("colocated_roles_all_on_gpu0", "swiftray/placement.py",
      "bundles_of[d.name] = [i * span for i in range(d.num_workers)]", "bundles_of[d.name] = [0] * d.num_workers",
      ("tests/test_plan.py::test_reference_grpo_command_colocates_one_engine_per_gpu_beside_its_rank",)),
    M("engines_never_get_own_gpus", "swiftray/placement.py",
      "rollout.num_workers * rollout.gpus_per_worker <= free", "rollout.num_workers * rollout.gpus_per_worker < free",
      ("tests/test_plan.py::test_sixteen_gpus_place_engines_apart_from_the_policy",)),
    M("cpu_threads_not_shared_out", "swiftray/plan.py", "threads_share=share(1.0 / world) if rl or algorithm.role_specs else None",
      "threads_share=share(1.0) if rl or algorithm.role_specs else None", ("tests/test_plan.py::test_cpu_plan_fits_every_role_on_a_small_machine",)),
    M("steps_per_epoch_rounded_down", "swiftray/plan.py", "steps_per_epoch = -(-train_units // per_step)",
      "steps_per_epoch = train_units // per_step", ("tests/test_plan.py::test_sft_plan_counts_steps_up_and_checks_values_first",)),
    M("lr_schedule_counts_generations", "swiftray/plan.py",
      "batch.optimizer_steps_per_generation * algorithm.num_iterations if rl else 1)", "1)",
      ("tests/test_plan.py::test_steps_per_generation_splits_a_generation_into_optimizer_steps",)),
    M("epoch_strategy_uses_steps", "swiftray/schedule.py",
      'period = self.steps_per_epoch if strategy == "epoch" else every', "period = every", ("tests/test_schedule.py",)),
    M("first_step_always_logged", "swiftray/schedule.py", "(step == 1 and self.logging_first_step)", "step == 1",
      ("tests/test_schedule.py",)),
    M("value_bounds_not_checked", "swiftray/arguments.py", "            if problem:\n                raise ArgumentError",
      "            if False:\n                raise ArgumentError", ("tests/test_plan.py::test_sft_plan_counts_steps_up_and_checks_values_first",)),
    M("compat_note_not_printed", "swiftray/compat.py", "if hasattr(args, name) and getattr(args, name) != _default(type(args), name)]",
      "if False]", ("tests/test_flags.py::test_compatibility_flags_print_their_reason_and_change_nothing",)),
    M("model_name_not_planned", "swiftray/plan.py", "tuple(args.model_name) if args.model_name else None,", "None,",
      ("tests/test_flags.py::test_every_field_changes_the_plan_or_is_listed",)),
    # --- Megatron: the reductions over data- and tensor-parallel ranks
    M("megatron_tokens_not_summed_over_dp", "swiftray/actors/megatron_policy.py",
      "dist.all_reduce(tokens, group=ps.get_data_parallel_group())", "tokens = tokens * 1",
      ("tests/test_megatron_actor.py::test_two_ranks_match_one_rank",)),
    M("megatron_entropy_not_summed_over_tp", "swiftray/megatron/batch.py",
      "dist.all_reduce(sums, group=tp_group)", "sums = sums * 1",
      ("tests/test_megatron_actor.py",)),
    # --- rollout correction and the elastic pool
    M("rollout_is_weights_ignored", "swiftray/algorithms/grpo_math.py", "per_token = per_token * is_weights",
      "per_token = per_token * 1", ("tests/test_rollout_correction.py::test_weights_scale_the_policy_gradient_term_only",)),
    M("engines_never_yield_room", "swiftray/controller/supervision.py",
      'can_yield = role != "rollout" and self._spare_engines() > 0', "can_yield = False",
      ("tests/test_faults_unit.py",)),
]


def selections() -> dict[tuple[str, ...], list[Mutation]]:
    out: dict[tuple[str, ...], list[Mutation]] = {}
    for m in MUTATIONS:
        out.setdefault(m.tests, []).append(m)
    return out


def scratch_copy() -> Path:
    """The working tree without venvs, caches and outputs, in a temporary folder."""
    dest = Path(tempfile.mkdtemp(prefix="swiftray-mutations-")) / "repo"
    ignore = shutil.ignore_patterns(".git", ".venv*", "__pycache__", ".pytest_cache", ".ruff_cache", "output*",
                                    "demo*", "benchmarks/.env", "benchmarks/work", "*.egg-info")
    shutil.copytree(REPO, dest, ignore=ignore)
    return dest


def run_tests(repo: Path, tests: tuple[str, ...]) -> tuple[bool, float]:
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE",
           "TOKENIZERS_PARALLELISM": "false", "SWIFTRAY_NO_PROGRESS": "1", "RAY_ADDRESS": "local"}
    start = time.time()
    done = subprocess.run([sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *tests], cwd=repo,
                          env=env, capture_output=True, text=True)
    return done.returncode == 0, time.time() - start


def apply(repo: Path, m: Mutation) -> str:
    path = repo / m.file
    text = path.read_text()
    count = text.count(m.old)
    if count != 1:
        raise SystemExit(f"mutation {m.name}: {m.file} holds the text to change {count} times (expected once)")
    path.write_text(text.replace(m.old, m.new))
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--list", action="store_true", help="print one mutation a line and exit")
    parser.add_argument("--only", action="append", default=[], help="run only this mutation (repeatable)")
    opts = parser.parse_args()
    if opts.list:
        for m in MUTATIONS:
            print(f"{m.name}\t{m.file}\t{m.old.strip()!r} -> {m.new.strip()!r}")
        return
    unknown = set(opts.only) - {m.name for m in MUTATIONS}
    if unknown:
        raise SystemExit(f"unknown mutation(s): {', '.join(sorted(unknown))}; see --list")
    chosen = [m for m in MUTATIONS if not opts.only or m.name in opts.only]
    repo = scratch_copy()
    start, results = time.time(), []
    try:
        for tests in dict.fromkeys(m.tests for m in chosen):
            ok, seconds = run_tests(repo, tests)
            if not ok:
                raise SystemExit(f"the unmutated tests fail: {' '.join(tests)}; fix them first")
            for m in [m for m in chosen if m.tests == tests]:
                original = apply(repo, m)
                try:
                    passed, seconds = run_tests(repo, tests)
                finally:
                    (repo / m.file).write_text(original)
                results.append((m, not passed))
                print(f"{'caught' if not passed else 'MISSED'}  {m.name:<40} {seconds:6.1f} s  {m.file}", flush=True)
    finally:
        shutil.rmtree(repo.parent, ignore_errors=True)
    caught = sum(c for _, c in results)
    print(f"\n{caught} of {len(results)} mutations caught in {(time.time() - start) / 60:.1f} min")
    if caught < len(results):
        sys.exit(1)


if __name__ == "__main__":
    main()
