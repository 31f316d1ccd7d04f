"""Preference learning and reward models learn, on held-out data, against shuffled-label controls.

For each seed, as scripts/demo.py does first:

    1. build the tiny model and SFT it on `swiftray/arithmetic:easy_train` until `easy_val` accuracy
       reaches --sft_target (the model knows the format, far from mastery);
    2. from that checkpoint, train each method on `swiftray/arithmetic-pairs:easy_train` (right answer
       chosen, a plausible wrong one rejected) and, as its control, on the same pairs with chosen and
       rejected swapped at random (a fair coin per pair, seeded): the control must not gain. `dpo_policy`
       and `rm_policy` train instead on the SFT model's own samples of the training prompts, each right
       answer (by the accuracy rule) against a wrong one (--policy_samples per prompt). `rm_lines` and
       `rm_arith` train on minimal pairs that each break one checkable thing in the working (see
       line_check_pairs), `rm_slips` on 48,000 such pairs each drawn afresh (sampled_break_pairs);
       --rm_base starts a reward model from a pair method's checkpoint instead of SFT;
    3. measure on held-out data (`easy_test`: problems no run trained on):
       - preference accuracy over the 300 held-out pairs: the share in which the trained model's implicit
         reward ranks chosen above rejected (ties count half, so the SFT model scores 50%). DPO and KTO:
         beta x (log pi - log ref) with the SFT model as ref; SimPO: its own reward, the per-token
         average log-prob, for which the SFT model itself has a score;
       - greedy task accuracy on the 300 held-out problems (the accuracy reward);
       - reward model: the share of held-out pairs it scores chosen above rejected;
       - for reward models and new pair runs, the same on the SFT model's own held-out pairs (its right
         against its wrong samples of the held-out prompts): what GRPO asks a reward model to rank;
    4. GRPO from the SFT checkpoint with `--reward_model` a trained RM (--grpo_reward_model) as its only
       reward, and as the control with an untrained RM (the SFT model with a fresh score head): task
       accuracy after each.

Results go to WORK/seedN/result.json and, with --write_doc, to docs/preference_runs.md.
Run: `python scripts/preference_learning.py --seeds 42 7 --write_doc` (about 25 minutes per seed on 2 cores, 10
more with the two GRPO arms; a rerun keeps every run whose settings did not change).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from demo import heldout_accuracy, last_checkpoint, sft_until  # noqa: E402
from preference_data import (  # noqa: E402
    ARITH_BREAKS,
    BREAKS,
    LINE_PAIRS_PER_PROBLEM,
    SAMPLED_PAIRS,
    line_check_pairs,
    policy_pairs,
    sampled_break_pairs,
    training_pairs,
)

from swiftray.arguments import RlhfArguments  # noqa: E402
from swiftray.cli_parser import parse_args  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
# Pair-trained methods, each with its `swiftray rlhf` flags. "rpo" is DPO plus the NLL of the chosen side
# (`--rpo_alpha 1`, Pang et al. 2024: on reasoning tasks plain DPO moves preference more than accuracy).
PAIR_METHODS = {"dpo": ["--rlhf_type", "dpo"], "rpo": ["--rlhf_type", "dpo", "--rpo_alpha", "1"],
                "kto": ["--rlhf_type", "kto"], "simpo": ["--rlhf_type", "simpo", "--cpo_alpha", "0"],
                "orpo": ["--rlhf_type", "orpo"], "cpo": ["--rlhf_type", "cpo"],
                # DPO on the SFT model's own samples, right against wrong by the accuracy rule (on-policy pairs)
                "dpo_policy": ["--rlhf_type", "dpo"]}
# Reward models: trained on the built-in pairs ("rm"), on the SFT model's own samples labelled by the
# accuracy rule ("rm_policy"), or on minimal pairs that each break one thing visible in the working
# ("rm_lines", and "rm_arith" with mostly arithmetic slips: see line_check_pairs; "rm_slips": the same breaks on
# 48,000 pairs drawn afresh, see sampled_break_pairs: the one that drives GRPO, docs/preference_runs.md).
REWARD_MODELS = ("rm", "rm_policy", "rm_lines", "rm_arith", "rm_slips")
LINE_CHECK_MODELS = ("rm_lines", "rm_arith", "rm_slips")
# rm_lines, rm_arith, rm_slips: 16 pairs a step, a warm-up and cosine decay, no weight decay (after common()'s flags, so these win)
RM_LINES_FLAGS = ["--per_device_train_batch_size", "16", "--lr_scheduler_type", "cosine", "--warmup_ratio", "0.03",
                  "--weight_decay", "0"]
TEST_PAIRS = "swiftray/arithmetic-pairs:easy_test"
TEST_TASK = "swiftray/arithmetic:easy_test"
TEST_SAMPLES = 4  # the SFT model's samples per held-out prompt, for held-out pairs of its own right/wrong answers
NOTES_MARKER = "<!-- notes: written by hand, kept when --write_doc rewrites the tables above -->"


# ---------------------------------------------------------------------------------------- held-out measures


def heldout_pairs(tokenizer_dir: Path, dataset: str = TEST_PAIRS) -> tuple[list[dict], object]:
    from swiftray.data.loader import load_datasets
    from swiftray.data.preference import encode_pair, normalize_pair_row
    from swiftray.data.template import Template
    from swiftray.models.loader import load_tokenizer

    tokenizer = load_tokenizer(str(tokenizer_dir))
    template = Template(tokenizer)
    rows = list(load_datasets([dataset], shuffle=False, normalize=normalize_pair_row))
    return [encode_pair(template, row) for row in rows], tokenizer


def pair_logps(model_dir: Path, pairs: list[dict], pad: int) -> tuple[list[float], list[float], list[int], list[int]]:
    """Completion log-prob sums and token counts of every held-out pair's chosen and rejected side."""
    import torch

    from swiftray.algorithms.preference_math import sequence_logps, split_pairs
    from swiftray.data.preference import preference_batch
    from swiftray.models.inference import load_inference_model

    model, _ = load_inference_model(str(model_dir))
    out: list[list] = [[], [], [], []]
    with torch.no_grad():
        for start in range(0, len(pairs), 32):
            batch = preference_batch(pairs[start:start + 32], pad)
            logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
            targets = batch["labels"][:, 1:]
            mask = targets != -100
            token = torch.log_softmax(logits[:, :-1].double(), -1).gather(-1, targets.clamp(min=0)[..., None])[..., 0]
            sums, lengths = sequence_logps(token * mask, mask)
            for i, values in enumerate((*split_pairs(sums), *split_pairs(lengths))):
                out[i] += values.tolist()
    return tuple(out)  # type: ignore[return-value]


def ranked(chosen: list[float], rejected: list[float]) -> float:
    """Share of pairs with chosen above rejected; ties count half."""
    return sum(1.0 if c > r else 0.5 if c == r else 0.0 for c, r in zip(chosen, rejected)) / len(chosen)


def preference_accuracy(policy: Path, reference: Path, pairs: list[dict], pad: int) -> dict[str, float]:
    """Held-out preference accuracy by the DPO/KTO implicit reward (log pi - log ref) and by the average
    log-prob (SimPO's reward, reference-free)."""
    pc, pr, lc, lr = pair_logps(policy, pairs, pad)
    rc, rr, _, _ = pair_logps(reference, pairs, pad) if policy != reference else (pc, pr, lc, lr)
    return {"implicit_reward": ranked([p - r for p, r in zip(pc, rc)], [p - r for p, r in zip(pr, rr)]),
            "average_logprob": ranked([p / n for p, n in zip(pc, lc)], [p / n for p, n in zip(pr, lr)])}


def reward_model_accuracy(model_dir: Path, pairs: list[dict], pad: int) -> float:
    import torch

    from swiftray.data.preference import preference_batch
    from swiftray.models.reward_model import load_reward_model, reward_scores

    model = load_reward_model(str(model_dir)).eval()
    chosen, rejected = [], []
    with torch.no_grad():
        for start in range(0, len(pairs), 32):
            batch = preference_batch(pairs[start:start + 32], model.config.pad_token_id)
            scores = reward_scores(model, batch["input_ids"], batch["attention_mask"])
            chosen += scores[0::2].tolist()
            rejected += scores[1::2].tolist()
    return ranked(chosen, rejected)


def run_checkpoint(run_dir: Path, measured: dict) -> Path | None:
    """The checkpoint a kept result was measured on: recorded, or the run folder's only run's last one."""
    if "checkpoint" in measured:
        return Path(measured["checkpoint"])
    versions = sorted(run_dir.glob("v*-*"))
    return last_checkpoint(versions[0]) if len(versions) == 1 else None


def untrained_reward_model(sft: Path, out: Path, seed: int) -> Path:
    """The SFT model with a fresh (seeded) score head: a reward model that learnt nothing."""
    from swiftray.models.loader import load_tokenizer
    from swiftray.models.reward_model import load_reward_model, save_reward_model

    if not (out / "config.json").exists():
        save_reward_model(load_reward_model(str(sft), seed=seed), str(out), tokenizer=load_tokenizer(str(sft)))
    return out


# ---------------------------------------------------------------------------------------- runs


def rlhf(flags: list[str]) -> Path:
    from swiftray.controller import run_rlhf

    return last_checkpoint(run_rlhf(parse_args(RlhfArguments, flags)))


def common(model: Path, out: Path, seed: int, steps: int) -> list[str]:
    return ["--model", str(model), "--train_type", "full", "--max_steps", str(steps),
            "--lr_scheduler_type", "constant", "--gradient_checkpointing", "false", "--save_steps", str(steps),
            "--logging_steps", "10", "--eval_strategy", "no", "--report_to", "none", "--seed", str(seed),
            "--output_dir", str(out)]


def train_preference(method: str, sft: Path, work: Path, seed: int, shuffled: bool, opts: argparse.Namespace) -> Path:
    dataset = training_pairs(method.endswith("_policy"), sft, work, seed, shuffled, opts, kto=method == "kto")
    # pure SimPO (--cpo_alpha 0): no NLL term, so the gain comes from the preferences alone
    flags = [*PAIR_METHODS[method], "--dataset", dataset, "--per_device_train_batch_size", str(opts.pairs_per_step),
             "--gradient_accumulation_steps", "1", "--learning_rate", str(opts.lr[method]),
             *opts.method_flags.get(method, [])]
    name = f"{method}{'_control' if shuffled else ''}"
    return rlhf(flags + common(sft, work / name, seed, opts.steps[method]))


def grpo(sft: Path, reward_model: Path, work: Path, name: str, seed: int, opts: argparse.Namespace) -> Path:
    flags = ["--rlhf_type", "grpo", "--dataset", "swiftray/arithmetic:easy_train", "--reward_model", str(reward_model),
             "--per_device_train_batch_size", "64", "--gradient_accumulation_steps", "1", "--num_generations", "8",
             "--max_completion_length", "48", "--temperature", "1.0", "--learning_rate", str(opts.grpo_lr),
             "--beta", str(opts.grpo_beta)]
    every = ["--save_steps", str(opts.grpo_eval_every)] if opts.grpo_eval_every else []
    return rlhf(flags + common(sft, work / name, seed, opts.grpo_steps) + every)


def accuracy_curve(last: Path) -> dict[str, float]:
    """Held-out task accuracy at each checkpoint of the run that ends in `last` (its step -> accuracy)."""
    steps = sorted(last.parent.glob("checkpoint-*"), key=lambda c: int(c.name.split("-")[1]))
    return {c.name.split("-")[1]: heldout_accuracy(c, TEST_TASK, 300, 48) for c in steps}


def run_seed(seed: int, opts: argparse.Namespace) -> dict:
    from swiftray.models.tiny import make_tiny_model

    work = Path(opts.work_dir) / f"seed{seed}"
    start = time.time()
    model_dir = work / "tiny-model"
    if not (model_dir / "config.json").exists():
        make_tiny_model(model_dir, seed=seed, hidden_size=128, num_layers=4, intermediate_size=512)
    sft_opts = argparse.Namespace(seed=seed, sft_chunk=50, sft_max_steps=600, sft_target=opts.sft_target)
    sft_note = work / "sft_checkpoint.txt"
    if sft_note.exists():
        sft = Path(sft_note.read_text().strip())
    else:
        sft, _curve = sft_until(model_dir, work, sft_opts)
        sft_note.write_text(str(sft))
    pairs, tokenizer = heldout_pairs(sft)
    pad = tokenizer.pad_token_id
    # The SFT model's own right/wrong samples on held-out prompts: what a reward model must rank for GRPO.
    policy_test = heldout_pairs(sft, policy_pairs(sft, TEST_TASK, work / f"policy_pairs_test_x{TEST_SAMPLES}.jsonl",
                                                  TEST_SAMPLES, seed + 1))[0]
    saved = work / "result.json"
    # Runs already made with the same settings are kept (a rerun redoes only what changed).
    earlier = json.loads(saved.read_text()) if saved.exists() else {}
    result: dict = {"seed": seed, "sft_checkpoint": str(sft), "sft": earlier.get("sft") or {
        "task_accuracy": heldout_accuracy(sft, TEST_TASK, 300, 48), **preference_accuracy(sft, sft, pairs, pad)}}
    print(f"\n== seed {seed} SFT: {result['sft']}\n", flush=True)

    def done(name: str, settings: dict) -> bool:
        """Reuse `name`'s earlier result if its settings are the same."""
        if earlier.get(name, {}).get("settings") == settings:
            result[name] = earlier[name]
            print(f"\n== seed {seed} {name} (kept): {result[name]}\n", flush=True)
            return True
        return False

    def backbone(name: str) -> Path:
        """A reward model's starting point: the SFT checkpoint, or a pair method's trained checkpoint."""
        if name == "sft":
            return sft
        ckpt = run_checkpoint(work / name, earlier.get(name) or result.get(name) or {})
        if ckpt is None:
            raise SystemExit(f"--rm_base {name}: no single {name} run under {work / name}; run --methods {name} first")
        return ckpt

    def keep(name: str, settings: dict, measured: dict) -> None:
        result[name] = {**measured, "settings": settings}
        saved.write_text(json.dumps({**earlier, **result}, indent=2))
        print(f"\n== seed {seed} {name}: {result[name]}\n", flush=True)

    for method in opts.methods:
        if method in PAIR_METHODS:
            settings = {"lr": opts.lr[method], "steps": opts.steps[method], "pairs_per_step": opts.pairs_per_step,
                        "flags": PAIR_METHODS[method] + opts.method_flags.get(method, [])}
            if method.endswith("_policy"):
                settings["samples"] = opts.policy_samples
            for shuffled in (False, True):
                name = f"{method}{'_control' if shuffled else ''}"
                if not done(name, settings):
                    ckpt = train_preference(method, sft, work, seed, shuffled, opts)
                    keep(name, settings, {"task_accuracy": heldout_accuracy(ckpt, TEST_TASK, 300, 48),
                                          **preference_accuracy(ckpt, sft, pairs, pad), "checkpoint": str(ckpt)})
                # and by the implicit reward on the SFT model's own held-out right/wrong pairs (added since
                # some runs were kept: measured where the run's checkpoint is known)
                ckpt = run_checkpoint(work / name, result[name])
                if "own_pairs_implicit_reward" not in result[name] and ckpt is not None:
                    own = preference_accuracy(ckpt, sft, policy_test, pad)["implicit_reward"]
                    keep(name, settings, {**result[name], "own_pairs_implicit_reward": own})
        elif method in REWARD_MODELS:
            settings = {"lr": opts.lr[method], "steps": opts.steps[method], "pairs_per_step": opts.pairs_per_step}
            if method == "rm_policy":
                settings["samples"] = opts.policy_samples
            if method in LINE_CHECK_MODELS:
                settings["flags"] = RM_LINES_FLAGS
            if opts.rm_base.get(method, "sft") != "sft":
                settings["base"] = opts.rm_base[method]
            for shuffled in (False, True)[:1 if method in opts.skip_controls else 2]:
                name = f"{method}{'_control' if shuffled else ''}"
                if not done(name, settings):
                    if method == "rm_slips":
                        dataset = sampled_break_pairs(work, seed, shuffled)
                    elif method in LINE_CHECK_MODELS:
                        dataset = line_check_pairs(work, seed, shuffled, BREAKS if method == "rm_lines" else ARITH_BREAKS)
                    else:
                        dataset = training_pairs(method == "rm_policy", sft, work, seed, shuffled, opts)
                    flags = ["--rlhf_type", "rm", "--dataset", dataset,
                             "--per_device_train_batch_size", str(opts.pairs_per_step),
                             "--gradient_accumulation_steps", "1", "--learning_rate", str(opts.lr[method])]
                    flags += common(backbone(settings.get("base", "sft")), work / name, seed, opts.steps[method]) + settings.get("flags", [])
                    keep(name, settings, {"checkpoint": str(rlhf(flags))})
                # measured here, so a kept reward model gains a measure added since it was trained
                ranks = {key: reward_model_accuracy(Path(result[name]["checkpoint"]), heldout, pad)
                         for key, heldout in (("pair_accuracy", pairs), ("policy_pair_accuracy", policy_test))
                         if key not in result[name]}
                if ranks:
                    keep(name, settings, {**result[name], **ranks})
        elif method == "grpo_rm":
            trained = Path(opts.reward_model or result[opts.grpo_reward_model]["checkpoint"])
            # the control: the trained RM's own backbone with a fresh score head
            base = "sft" if opts.reward_model else result[opts.grpo_reward_model]["settings"].get("base", "sft")
            untrained = untrained_reward_model(backbone(base), work / ("untrained-rm" + ("" if base == "sft" else f"-{base}")),
                                               seed)
            for name, rm in (("grpo_rm", trained), ("grpo_rm_control", untrained)):
                settings = {"lr": opts.grpo_lr, "steps": opts.grpo_steps, "beta": opts.grpo_beta,
                            "reward_model": str(rm)}
                if not done(name, settings):
                    curve = accuracy_curve(grpo(sft, rm, work, name, seed, opts))
                    keep(name, settings, {"task_accuracy": curve[str(opts.grpo_steps)], "curve": curve,
                                          "reward_model": str(rm)})
    result["minutes"] = round((time.time() - start) / 60, 1)
    # Runs of methods not asked for this time stay in the file and the report.
    merged = {**earlier, **result}
    saved.write_text(json.dumps(merged, indent=2))
    return merged


# ---------------------------------------------------------------------------------------- report


def pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def pct_or_dash(measured: dict, key: str) -> str:
    """A figure that a run may lack (a control not trained this time)."""
    return pct(measured[key]) if key in measured else "-"


def change(after: float, before: float) -> str:
    return f"{100 * (after - before):+.1f}"


def render(results: list[dict], opts: argparse.Namespace) -> str:
    def own(measured: dict) -> str:
        return pct_or_dash(measured, "own_pairs_implicit_reward")

    lines = ["# Preference learning runs", "",
             "What `scripts/preference_learning.py` measured (`python scripts/preference_learning.py --seeds "
             f"{' '.join(str(r['seed']) for r in results)} --write_doc`) on the development machine (2 CPU cores, "
             "shared with other jobs). Every run starts from the seed's SFT checkpoint (the demo's: SFT on "
             "`swiftray/arithmetic:easy_train` until `easy_val` accuracy reaches "
             f"{pct(opts.sft_target)}); held-out figures are over the 300 `easy_test` problems and their pairs, "
             "which no run trained on. Controls train on the same pairs with chosen and rejected swapped at random.",
             "", "Settings: " + ", ".join(f"{m} {r['settings']['steps']} steps at lr {r['settings']['lr']:g}"
                                          for m, r in results[0].items() if isinstance(r, dict) and "settings" in r
                                          and not m.endswith("_control") and not m.startswith("grpo"))
             + f"; {opts.pairs_per_step} pairs (KTO: examples) per step"
             + (f"; GRPO {g['steps']} steps at lr {g['lr']:g}, 8 prompts x 8 completions, beta {g['beta']:g}, the "
                "reward model its only reward." if (g := results[0].get("grpo_rm", {}).get("settings")) else "."), ""]
    lines += ["## Preference accuracy and task accuracy (held-out)", "",
              "Preference accuracy: DPO, RPO and KTO by their implicit reward log pi - log ref (the SFT model is 50% "
              "by construction); SimPO and ORPO by the average log-prob (SimPO's reward; ORPO's odds rise with it), "
              "for which the SFT model has a score of its own.", "",
              "| seed | method | preference accuracy: SFT -> trained (change) | control | implicit reward on the SFT "
              "model's own held-out pairs: trained / control | task accuracy: SFT -> trained (change) | control |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in results:
        for method in PAIR_METHODS:
            if method not in r:
                continue
            key = "average_logprob" if method in ("simpo", "orpo", "cpo") else "implicit_reward"
            base, got, ctl = r["sft"], r[method], r[f"{method}_control"]
            lines.append(f"| {r['seed']} | {method} | {pct(base[key])} -> {pct(got[key])} ({change(got[key], base[key])}) | "
                         f"{pct(ctl[key])} ({change(ctl[key], base[key])}) | {own(got)} / {own(ctl)} | "
                         f"{pct(base['task_accuracy'])} -> "
                         f"{pct(got['task_accuracy'])} ({change(got['task_accuracy'], base['task_accuracy'])}) | "
                         f"{pct(ctl['task_accuracy'])} ({change(ctl['task_accuracy'], base['task_accuracy'])}) |")
    if any("dpo_policy" in r for r in results):
        lines += ["", f"`dpo_policy` is DPO on the SFT model's own samples of the training prompts ({opts.policy_samples} "
                  "per prompt at temperature 1; each right answer, by the accuracy rule, against a different wrong one): "
                  "on-policy pairs, as iterative DPO makes them. Its control trains on the same pairs with their sides "
                  f"swapped at random. The SFT model's own held-out pairs are the same kind of pair on the held-out "
                  f"prompts ({TEST_SAMPLES} samples per prompt)."]
    if any(m in r for m in ("rpo", "orpo", "cpo") for r in results):
        lines += ["", "RPO (DPO plus the chosen side's NLL, `--rpo_alpha 1`), ORPO and CPO carry an NLL term; DPO, KTO "
                  "and pure SimPO (`--cpo_alpha 0`) do not. Their controls keep the NLL on the randomly chosen side "
                  "(the right answer half the time), so a control's task-accuracy change shows what the NLL alone "
                  "gives, and the gap to it what the preferences add."]
    if any(m in r for m in REWARD_MODELS for r in results):
        lines += ["", "## Reward models: held-out pairs ranked right (chance: 50%)", "",
                  "Two kinds of held-out pair: the built-in ones (a planted mistake), and the SFT model's own samples "
                  f"on the held-out prompts ({TEST_SAMPLES} per prompt at temperature 1, each right one against a "
                  "wrong one): what GRPO asks a reward model to rank.", "",
                  "| seed | trained on (backbone: SFT unless named) | steps | built-in pairs | control (shuffled) | the SFT model's own pairs | "
                  "control |", "| --- | --- | --- | --- | --- | --- | --- |"]
        for r in results:
            for method in REWARD_MODELS:
                if method in r:
                    rm, ctl = r[method], r.get(f"{method}_control", {})
                    data = {"rm": "built-in pairs", "rm_lines": f"line-check pairs x{LINE_PAIRS_PER_PROBLEM}",
                            "rm_arith": f"line-check pairs x{LINE_PAIRS_PER_PROBLEM}, mostly arithmetic slips",
                            "rm_slips": f"{SAMPLED_PAIRS:,} pairs each drawn afresh, mostly arithmetic slips"}.get(
                        method) or f"own samples x{rm['settings']['samples']}"
                    data += f", from {rm['settings']['base'].upper()}" if "base" in rm["settings"] else ""
                    lines.append(f"| {r['seed']} | {data} | {rm['settings']['steps']} | {pct(rm['pair_accuracy'])} | "
                                 f"{pct_or_dash(ctl, 'pair_accuracy')} | {pct(rm['policy_pair_accuracy'])} | "
                                 f"{pct_or_dash(ctl, 'policy_pair_accuracy')} |")
    if any("grpo_rm" in r for r in results):
        lines += ["", "## GRPO with the reward model as its only reward: held-out task accuracy", "",
                  "| seed | reward model | SFT | GRPO, trained RM (change) | GRPO, untrained RM (change) | trained RM: "
                  "accuracy by step | untrained RM: accuracy by step |", "| --- | --- | --- | --- | --- | --- | --- |"]

        def curve(measured: dict) -> str:
            return ", ".join(f"{pct(a)} ({s})" for s, a in measured.get("curve", {}).items()) or "-"

        for r in results:
            if "grpo_rm" in r:
                base, got, ctl = r["sft"]["task_accuracy"], r["grpo_rm"], r.get("grpo_rm_control", {})
                rm = next((m for m in REWARD_MODELS if m in r and r[m].get("checkpoint") == got["reward_model"]), "")
                lines.append(f"| {r['seed']} | {rm or got['reward_model']} | {pct(base)} | {pct(got['task_accuracy'])} "
                             f"({change(got['task_accuracy'], base)}) | "
                             + (f"{pct(ctl['task_accuracy'])} ({change(ctl['task_accuracy'], base)})" if ctl else "-")
                             + f" | {curve(got)} | {curve(ctl)} |")
    # Hand-written reading of the figures, below this marker, survives a rewrite.
    doc = REPO / "docs" / "preference_runs.md"
    old = doc.read_text() if doc.exists() else ""
    lines += ["", NOTES_MARKER, old.split(NOTES_MARKER, 1)[1].strip("\n") if NOTES_MARKER in old else "", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work_dir", default="preference_runs")
    p.add_argument("--seeds", type=int, nargs="+", default=[42, 7])
    p.add_argument("--methods", nargs="+", default=["dpo", "rpo", "kto", "orpo", "simpo", "rm", "rm_policy", "grpo_rm"],
                   choices=[*PAIR_METHODS, *REWARD_MODELS, "grpo_rm"])
    p.add_argument("--sft_target", type=float, default=0.3)
    p.add_argument("--pairs_per_step", type=int, default=8)
    p.add_argument("--steps", type=json.loads, default={"dpo": 150, "rpo": 150, "kto": 150, "simpo": 150, "orpo": 150,
                                                        "cpo": 150, "rm": 150, "rm_policy": 300, "rm_lines": 1200, "rm_arith": 1200, "rm_slips": 3000,
                                                        "dpo_policy": 250},
                   help='JSON: optimizer steps per method, e.g. \'{"dpo": 150}\'')
    p.add_argument("--lr", type=json.loads, default={"dpo": 2e-5, "rpo": 5e-5, "kto": 2e-4, "simpo": 5e-5, "orpo": 2e-4,
                                                     "cpo": 2e-4, "rm": 5e-4, "rm_policy": 5e-4, "rm_lines": 3e-4, "rm_arith": 3e-4, "rm_slips": 3e-4,
                                                     "dpo_policy": 2e-5},
                   help="JSON: learning rate per method")
    p.add_argument("--method_flags", type=json.loads, default={},
                   help='JSON: extra `swiftray rlhf` flags per method, e.g. \'{"dpo": ["--rpo_alpha", "1"]}\'')
    p.add_argument("--skip_controls", nargs="*", default=[], choices=[*PAIR_METHODS, *REWARD_MODELS],
                   help="methods whose shuffled-label control is not trained this time")
    p.add_argument("--rm_base", type=json.loads, default={},
                   help='JSON: a reward model\'s backbone, "sft" (the default) or a pair method whose trained checkpoint '
                        'solves more of the problems, e.g. \'{"rm_lines": "orpo"}\'; GRPO\'s policy starts from SFT '
                        "either way")
    p.add_argument("--policy_samples", type=int, default=16,
                   help="rm_policy, dpo_policy: the SFT model's samples per training prompt, for its own pairs")
    p.add_argument("--grpo_steps", type=int, default=100)
    p.add_argument("--grpo_lr", type=float, default=1e-4)
    p.add_argument("--grpo_eval_every", type=int, default=0,
                   help="grpo_rm: also save (and score on the held-out problems) every this many steps")
    p.add_argument("--grpo_beta", type=float, default=0.0, help="GRPO's KL coefficient against the SFT model")
    p.add_argument("--grpo_reward_model", choices=REWARD_MODELS, default="rm_policy",
                   help="grpo_rm: which of this run's reward models is GRPO's reward")
    p.add_argument("--reward_model", default=None, help="grpo_rm: a reward model directory to use instead")
    p.add_argument("--write_doc", action="store_true", help="write docs/preference_runs.md from the results")
    opts = p.parse_args(argv)
    defaults = {a.dest: a.default for a in p._actions}
    opts.steps, opts.lr = {**defaults["steps"], **opts.steps}, {**defaults["lr"], **opts.lr}
    results = [run_seed(seed, opts) for seed in opts.seeds]
    print(json.dumps(results, indent=2))
    if opts.write_doc:
        (REPO / "docs" / "preference_runs.md").write_text(render(results, opts))
    return results


if __name__ == "__main__":
    main(sys.argv[1:])
