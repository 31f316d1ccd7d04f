"""PPO, GRPO's RLOO and REINFORCE++ estimators, and GKD learn on held-out data, against controls.

For each seed, as scripts/demo.py does first:

    1. build the tiny model and SFT it on `swiftray/arithmetic:easy_train` until `easy_val` accuracy
       reaches --sft_target (the model knows the format, far from mastery): the SFT checkpoint;
    2. from that checkpoint, train each RL method on `swiftray/arithmetic:easy_train` with the
       accuracy and format rewards and, as its control, with the demo's noise reward (seeded uniform
       noise that ignores the completion: the control must not gain):
       - `--rlhf_type grpo --advantage_estimator rloo` and `... reinforce_plus_plus` (the demo's GRPO
         settings: 8 prompts x 8 completions a step, beta 0);
       - `--rlhf_type ppo` (one completion per prompt, a critic with a fresh value head on the SFT model);
    3. GKD: the teacher is the SFT checkpoint trained --teacher_extra_steps further (a stronger model of
       the same architecture and tokenizer); the student is the SFT checkpoint. `--rlhf_type gkd
       --teacher_model TEACHER` from the student and, as its control, toward the student itself
       (self-distillation: no stronger teacher to learn from);
    4. measure on held-out data (`easy_test`, never trained on, never used to stop):
       - greedy accuracy on its 300 problems, scored by the accuracy reward (demo.heldout_accuracy);
       - GKD: the divergence to the teacher, the mean per-token KL(teacher || student) in float64 over
         the teacher's greedy answers to the 300 held-out prompts (temperature 1).

Results go to WORK/results.json and, with --write_doc, to docs/rl_algorithms_runs.md.
Run: `python scripts/rl_algorithms_learning.py --seeds 42 7 --write_doc`. Each run's record is kept under
--work_dir and reused by a later invocation with the same flags, so an interrupted invocation resumes at
the first missing run; `--recorded_only --write_doc` writes the page from the records without training.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shlex
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo import heldout_accuracy, last_checkpoint, sft_until  # noqa: E402

from swiftray.arguments import RlhfArguments, SftArguments  # noqa: E402
from swiftray.cli_parser import parse_args  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
TRAIN = "swiftray/arithmetic:easy_train"
TEST = "swiftray/arithmetic:easy_test"
NOISE_PLUGIN = Path(__file__).resolve().parent / "plugins" / "noise_reward.py"
RL_METHODS = ("rloo", "reinforce_plus_plus", "ppo")
MAX_NEW_TOKENS = 48
HELDOUT = 300


# ---------------------------------------------------------------------------------------- runs


def common(model: Path, out: Path, seed: int, steps: int, lr: float) -> list[str]:
    return ["--model", str(model), "--train_type", "full", "--dataset", TRAIN, "--max_steps", str(steps),
            "--learning_rate", str(lr), "--lr_scheduler_type", "constant", "--gradient_checkpointing", "false",
            "--save_steps", str(steps), "--logging_steps", "5", "--eval_strategy", "no", "--report_to", "none",
            "--seed", str(seed), "--max_completion_length", str(MAX_NEW_TOKENS), "--temperature", "1.0",
            "--gradient_accumulation_steps", "1", "--output_dir", str(out)]


def rl_flags(method: str, noise: bool, opts: argparse.Namespace) -> list[str]:
    """The method's own flags; the reward is accuracy + format, or the demo's noise (the control)."""
    rewards = ["--reward_funcs", "demo_noise", "--external_plugins", str(NOISE_PLUGIN)] if noise else \
        ["--reward_funcs", "accuracy", "format"]
    if method == "ppo":
        # --num_cpus_per_worker 0.75: left unset, the plan asks Ray for 1 CPU for the policy plus 1.25 for
        # rollout, reward, reference and critic, more than a 2-core machine has (reported, not fixed here)
        return ["--rlhf_type", "ppo", "--num_cpus_per_worker", "0.75", "--per_device_train_batch_size", str(opts.ppo_prompts),
                "--num_ppo_epochs", str(opts.ppo_epochs), "--kl_coef", str(opts.ppo_kl_coef), *rewards]
    return ["--rlhf_type", "grpo", "--advantage_estimator", method, "--per_device_train_batch_size", "64",
            "--num_generations", "8", "--beta", "0.0", *rewards]


def cached_run(record: Path, flags: list[str], measure, recorded_only: bool = False) -> dict | None:
    """Train with `flags` and measure the checkpoint; the record (flags, figures, minutes, load, time) is
    kept in WORK, and a later invocation with the very same flags reuses it instead of training again.
    recorded_only: never train; None when there is no such record."""
    from swiftray.controller import run_rlhf

    if record.exists():
        saved = json.loads(record.read_text())
        if saved["flags"] == flags:
            return {**saved, "reused": True}
    if recorded_only:
        return None
    start = time.time()
    ckpt = last_checkpoint(run_rlhf(parse_args(RlhfArguments, flags)))
    minutes = round((time.time() - start) / 60, 2)
    saved = {"flags": flags, **measure(ckpt), "minutes": minutes, "checkpoint": str(ckpt),
             "load_end": [round(x, 2) for x in os.getloadavg()], "finished": now()}
    record.write_text(json.dumps(saved, indent=2))
    return saved


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def train_teacher(sft: Path, stop_step: int, work: Path, seed: int, extra: int) -> Path:
    """The SFT run continued --teacher_extra_steps further with demo.sft_until's settings (a constant
    learning rate, so resuming equals one longer run)."""
    from swiftray.controller import run_sft

    steps = stop_step + extra
    flags = ["--model", str(work / "tiny-model"), "--train_type", "full", "--dataset", TRAIN,
             "--max_steps", str(steps), "--per_device_train_batch_size", "32", "--gradient_accumulation_steps", "1",
             "--learning_rate", "3e-3", "--lr_scheduler_type", "constant", "--warmup_steps", "20",
             "--gradient_checkpointing", "false", "--save_steps", str(steps), "--logging_steps", "25",
             "--eval_strategy", "no", "--report_to", "none", "--seed", str(seed),
             "--output_dir", str(work / "teacher_sft"), "--resume_from_checkpoint", str(sft)]
    return last_checkpoint(run_sft(parse_args(SftArguments, flags)))


# ---------------------------------------------------------------------------------------- divergence


def teacher_answers(teacher: Path) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, the teacher's greedy answer ids) for the held-out prompts."""
    import torch

    from swiftray.data.loader import load_datasets
    from swiftray.data.template import Template
    from swiftray.models.generation import HFEngine, SamplingParams
    from swiftray.models.inference import load_inference_model

    torch.set_num_threads(max(1, os.cpu_count() or 1))
    rows = list(load_datasets([TEST], shuffle=False))[:HELDOUT]
    model, tokenizer = load_inference_model(str(teacher))
    template = Template(tokenizer)
    prompts = [template.encode_prompt(r["messages"][:-1]) for r in rows]
    outs = HFEngine(model, tokenizer, batch_size=64).generate(
        prompts, SamplingParams(max_new_tokens=MAX_NEW_TOKENS, temperature=0.0))
    return [(prompts[o.prompt_index], list(o.token_ids)) for o in outs if o.token_ids]


def answer_logprobs(model_dir: Path, pairs: list[tuple[list[int], list[int]]]) -> list:
    """Per pair, the model's float64 next-token log-probs [L, V] at the answer's L positions."""
    import torch

    from swiftray.models.inference import load_inference_model

    model, _ = load_inference_model(str(model_dir))
    out = []
    with torch.no_grad():
        for prompt, answer in pairs:  # one row at a time: no padding to get wrong, and 300 tiny rows are fast
            ids = torch.tensor([prompt + answer])
            logits = model(input_ids=ids).logits[0].double()
            out.append(torch.log_softmax(logits[len(prompt) - 1:-1], -1))
    return out


def heldout_divergence(teacher_logps: list, student: Path, pairs: list[tuple[list[int], list[int]]]) -> float:
    """Mean per-token KL(teacher || student) over the teacher's held-out answers."""
    total, tokens = 0.0, 0
    for t, s in zip(teacher_logps, answer_logprobs(student, pairs)):
        total += float((t.exp() * (t - s)).sum())
        tokens += t.shape[0]
    return total / tokens


# ---------------------------------------------------------------------------------------- a seed


def run_seed(seed: int, opts: argparse.Namespace) -> dict | None:
    from swiftray.models.tiny import make_tiny_model

    work = Path(opts.work_dir) / f"seed{seed}"
    start, load_start = time.time(), os.getloadavg()
    model_dir = work / "tiny-model"
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir, seed=seed, hidden_size=128, num_layers=4, intermediate_size=512)
    sft_opts = argparse.Namespace(seed=seed, sft_chunk=50, sft_max_steps=600, sft_target=opts.sft_target)
    done = work / "sft_checkpoint.json"
    if done.exists():
        saved = json.loads(done.read_text())
        sft, curve = Path(saved["checkpoint"]), saved["curve"]
    elif opts.recorded_only:
        return None
    else:
        sft, curve = sft_until(model_dir, work, sft_opts)
        done.write_text(json.dumps({"checkpoint": str(sft), "curve": curve}))
    before = heldout_accuracy(sft, TEST, HELDOUT, MAX_NEW_TOKENS)
    result: dict = {"seed": seed, "sft_checkpoint": str(sft), "sft_curve": curve, "sft_accuracy": before,
                    "load_start": [round(x, 2) for x in load_start]}
    print(f"\n== seed {seed} SFT: held-out {before:.1%}\n", flush=True)

    for method in opts.methods:
        if method not in RL_METHODS:
            continue
        steps, lr = opts.steps[method], opts.lr[method]
        for noise in (False, True):
            name = f"{method}{'_control' if noise else ''}"
            if opts.only and name not in opts.only:
                continue
            flags = rl_flags(method, noise, opts) + common(sft, work / name, seed, steps, lr)
            got = cached_run(work / f"{name}.json", flags,
                             lambda ckpt: {"accuracy": heldout_accuracy(ckpt, TEST, HELDOUT, MAX_NEW_TOKENS)},
                             opts.recorded_only)
            if got is None:
                continue
            result[name] = {**got, "steps": steps, "lr": lr}
            print(f"\n== seed {seed} {name}: held-out {before:.1%} -> {got['accuracy']:.1%} "
                  f"({got['minutes']} min)\n", flush=True)

    gkd = run_gkd(seed, sft, int(curve[-1][0]), work, opts) if "gkd" in opts.methods else None
    if gkd and "distilled" in gkd:
        result["gkd"] = gkd
    result["load_end"] = [round(x, 2) for x in os.getloadavg()]
    result["minutes"] = round((time.time() - start) / 60, 1)
    (work / "result.json").write_text(json.dumps(result, indent=2))
    return result


def run_gkd(seed: int, student: Path, stop_step: int, work: Path, opts: argparse.Namespace) -> dict | None:
    if opts.recorded_only and not (work / "gkd_distilled.json").exists():
        return None  # spares the teacher's evaluations when there is no GKD run to report
    record = work / "teacher_checkpoint.json"
    saved = json.loads(record.read_text()) if record.exists() else {}
    if saved.get("steps") == stop_step + opts.teacher_extra_steps:
        teacher = Path(saved["checkpoint"])
    elif opts.recorded_only:
        return None
    else:
        teacher = train_teacher(student, stop_step, work, seed, opts.teacher_extra_steps)
        record.write_text(json.dumps({"checkpoint": str(teacher), "steps": stop_step + opts.teacher_extra_steps}))
    pairs = teacher_answers(teacher)
    teacher_logps = answer_logprobs(teacher, pairs)
    out: dict = {"teacher_steps": stop_step + opts.teacher_extra_steps, "student_steps": stop_step,
                 "teacher_accuracy": heldout_accuracy(teacher, TEST, HELDOUT, MAX_NEW_TOKENS),
                 "student_accuracy": heldout_accuracy(student, TEST, HELDOUT, MAX_NEW_TOKENS),
                 "student_divergence": heldout_divergence(teacher_logps, student, pairs),
                 "answer_tokens": sum(len(a) for _, a in pairs), "steps": opts.steps["gkd"], "lr": opts.lr["gkd"]}
    for name, target in (("distilled", teacher), ("control", student))[:2 if opts.gkd_control else 1]:
        flags = ["--rlhf_type", "gkd", "--teacher_model", str(target), "--per_device_train_batch_size", "32",
                 "--lmbda", str(opts.gkd_lmbda)]
        flags += common(student, work / f"gkd_{name}", seed, opts.steps["gkd"], opts.lr["gkd"])
        got = cached_run(work / f"gkd_{name}.json", flags, lambda ckpt: {
            "accuracy": heldout_accuracy(ckpt, TEST, HELDOUT, MAX_NEW_TOKENS),
            "divergence": heldout_divergence(teacher_logps, ckpt, pairs)}, opts.recorded_only)
        if got is None:
            continue
        out[name] = got
        print(f"\n== seed {seed} gkd {name}: {out[name]} (student before: {out['student_accuracy']:.1%}, "
              f"KL {out['student_divergence']:.4f}; teacher {out['teacher_accuracy']:.1%})\n", flush=True)
    return out


# ---------------------------------------------------------------------------------------- report


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def change(after: float, before: float) -> str:
    return f"{100 * (after - before):+.1f}"


TITLES = {"rloo": "GRPO, `--advantage_estimator rloo`",
          "reinforce_plus_plus": "GRPO, `--advantage_estimator reinforce_plus_plus`",
          "ppo": "PPO (`--rlhf_type ppo`, a critic with a fresh value head)"}


def render(results: list[dict], opts: argparse.Namespace, command: str, started: str) -> str:
    lines = ["# RL algorithm learning runs: PPO, RLOO, REINFORCE++, GKD", "",
             f"Written by `scripts/rl_algorithms_learning.py` (started {started}) from the runs recorded under its work folder:", "",
             f"    {command}", "", *([opts.note, ""] if opts.note else []),
             "On the development machine: 2 CPU cores shared with other engineers' jobs, so the minutes are "
             "upper bounds. Load average (1, 5, 15 min) at the start and end of each seed in this invocation: "
             + "; ".join(f"seed {r['seed']}: {r['load_start']} -> {r['load_end']}" for r in results) + ".", "",
             "Every run starts from the seed's SFT checkpoint (the demo's: SFT on `swiftray/arithmetic:easy_train` "
             f"until `easy_val` greedy accuracy reaches {pct(opts.sft_target)}). Held-out accuracy is greedy "
             f"decoding on the {HELDOUT} `easy_test` problems (never trained on, never used to stop), scored by the "
             "`accuracy` reward; one problem is 0.33 points. Each method's control trains with the same settings "
             "on the demo's noise reward (seeded uniform noise that ignores the completion): it must not gain.", "",
             "Settings: GRPO estimators: 8 prompts x 8 completions a step, beta 0, temperature 1, rewards "
             "`accuracy format`; PPO: " f"{opts.ppo_prompts} prompts x 1 completion a step, "
             f"`--num_ppo_epochs {opts.ppo_epochs}` (one optimizer step each), `--kl_coef {opts.ppo_kl_coef}`, "
             "the other PPO flags at their defaults. Steps are generation steps; learning rates constant.", ""]
    lines += ["## SFT checkpoints (every run's start)", "", "| seed | SFT stop (steps, `easy_val`) | held-out after SFT |",
              "| --- | --- | --- |"]
    lines += [f"| {r['seed']} | {r['sft_curve'][-1][0]}, {pct(r['sft_curve'][-1][1])} | {pct(r['sft_accuracy'])} |"
              for r in results]
    missing = [f"{r['seed']} {name}" for r in results for m in opts.methods
               for name in ((m, f"{m}_control") if m in RL_METHODS else ("gkd distilled", "gkd control"))
               if (name not in r if m in RL_METHODS else name.split()[1] not in r.get("gkd", {}))]
    if missing:
        lines += ["", "Not run (no record under the work folder when this page was written): "
                  + ", ".join(missing) + "."]
    lines.append("")
    for method in RL_METHODS:
        if not any(method in r for r in results):
            continue
        lines += [f"## {TITLES[method]}", "",
                  "| seed | steps, lr | held-out after SFT | after | change | control (noise reward) after | "
                  "control change | minutes (run, control) |", "| --- | --- | --- | --- | --- | --- | --- | --- |"]
        for r in results:
            if method not in r:
                continue
            base, got, ctl = r["sft_accuracy"], r[method], r.get(f"{method}_control")
            control = (f"{pct(ctl['accuracy'])} | {change(ctl['accuracy'], base)} | {got['minutes']}, "
                       f"{ctl['minutes']}") if ctl else f"not run | - | {got['minutes']}, -"
            lines.append(f"| {r['seed']} | {got['steps']}, {got['lr']:g} | {pct(base)} | {pct(got['accuracy'])} | "
                         f"**{change(got['accuracy'], base)}** | {control} |")
        lines.append("")
    if any("gkd" in r for r in results):
        lines += ["## GKD (`--rlhf_type gkd --teacher_model TEACHER`)", "",
                  "The student is the SFT checkpoint; the teacher is the same SFT run continued "
                  f"{opts.teacher_extra_steps} steps further. Divergence: the mean per-token KL(teacher || student), "
                  "float64, over the teacher's greedy answers to the held-out prompts. The control distils the "
                  "student toward itself (no stronger teacher).", "",
                  f"Settings: 32 prompts a step, `--lmbda {opts.gkd_lmbda}`, `--beta` and `--temperature` at "
                  "their defaults (0.5, 0.9).", "",
                  "| seed | steps, lr | teacher accuracy | student accuracy: before -> after (change) | "
                  "KL to teacher: before -> after | control: accuracy (change), KL | minutes (run, control) |",
                  "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in results:
            if "gkd" not in r:
                continue
            g, ctl = r["gkd"], r["gkd"].get("control")
            control = (f"{pct(ctl['accuracy'])} ({change(ctl['accuracy'], g['student_accuracy'])}), "
                       f"{ctl['divergence']:.4f} | {g['distilled']['minutes']}, {ctl['minutes']}") if ctl else \
                f"not run | {g['distilled']['minutes']}, -"
            lines.append(f"| {r['seed']} | {g['steps']}, {g['lr']:g} | {pct(g['teacher_accuracy'])} | "
                         f"{pct(g['student_accuracy'])} -> {pct(g['distilled']['accuracy'])} "
                         f"(**{change(g['distilled']['accuracy'], g['student_accuracy'])}**) | "
                         f"{g['student_divergence']:.4f} -> **{g['distilled']['divergence']:.4f}** | {control} |")
        lines.append("")
    lines += ["## Every training run", "",
              "Each run's record (flags, figures, minutes, load) is kept under the work folder; an invocation whose "
              "run has the very same flags as a recorded one reuses the record (marked reused) rather than "
              "training again, so a run's minutes and load are those of the invocation that trained it.", "",
              "| seed | run | finished | minutes | load average at its end (1, 5, 15 min) | reused |",
              "| --- | --- | --- | --- | --- | --- |"]
    for r in results:
        runs = [(k, v) for k, v in r.items() if isinstance(v, dict) and "flags" in v]
        runs += [(f"gkd_{k}", v) for k, v in r.get("gkd", {}).items() if isinstance(v, dict) and "flags" in v]
        lines += [f"| {r['seed']} | {k} | {v['finished']} | {v['minutes']} | {v['load_end']} | "
                  f"{'yes' if v.get('reused') else 'no'} |" for k, v in runs]
    lines.append("")
    lines += ["Minutes per seed in this invocation (SFT if not reused, runs not reused, every evaluation): "
              + ", ".join(f"{r['seed']}: {r['minutes']}" for r in results), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="rl_algorithms_runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    p.add_argument("--methods", nargs="+", default=[*RL_METHODS, "gkd"], choices=[*RL_METHODS, "gkd"])
    p.add_argument("--sft_target", type=float, default=0.3)
    p.add_argument("--steps", type=json.loads, default={"rloo": 40, "reinforce_plus_plus": 40, "ppo": 30,
                                                        "gkd": 60},
                   help='JSON: generation steps per method, e.g. \'{"ppo": 100}\'')
    p.add_argument("--lr", type=json.loads, default={"rloo": 1e-4, "reinforce_plus_plus": 1e-4, "ppo": 1e-4,
                                                     "gkd": 3e-4},
                   help="JSON: learning rate per method")
    p.add_argument("--ppo_prompts", type=int, default=64, help="PPO: prompts (one completion each) per step")
    p.add_argument("--ppo_epochs", type=int, default=2, help="PPO: --num_ppo_epochs")
    p.add_argument("--ppo_kl_coef", type=float, default=0.05, help="PPO: --kl_coef")
    p.add_argument("--teacher_extra_steps", type=int, default=200, help="GKD: the teacher's SFT steps past the student's")
    p.add_argument("--gkd_lmbda", type=float, default=0.5, help="GKD: --lmbda")
    p.add_argument("--gkd_control", type=int, default=1, help="GKD: also run the self-distillation control (0: no)")
    p.add_argument("--recorded_only", action="store_true",
                   help="train nothing: report the SFT checkpoints and the runs already recorded under --work_dir")
    p.add_argument("--only", nargs="*", default=[], help="run only these RL runs, e.g. rloo_control")
    p.add_argument("--note", default="", help="a paragraph for the page's head (e.g. why some runs are missing)")
    p.add_argument("--write_doc", action="store_true", help="write docs/rl_algorithms_runs.md from the results")
    opts = p.parse_args(argv)
    defaults = {a.dest: a.default for a in p._actions}
    opts.steps, opts.lr = {**defaults["steps"], **opts.steps}, {**defaults["lr"], **opts.lr}
    started = now()
    command = "python scripts/rl_algorithms_learning.py " + shlex.join(sys.argv[1:] if argv is None else argv)
    if opts.note:
        command = command.replace(shlex.quote(opts.note), "'<the paragraph below>'")
    results = [r for r in (run_seed(seed, opts) for seed in opts.seeds) if r is not None]
    print(json.dumps(results, indent=2))
    Path(opts.work_dir, "results.json").write_text(json.dumps(results, indent=2))
    if opts.write_doc:
        (REPO / "docs" / "rl_algorithms_runs.md").write_text(render(results, opts, command, started))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
