"""`swiftray sft` end to end on the tiny model: it learns, writes ms-swift's output tree, resumes
exactly, and gives the same loss curve on two workers as on one."""

from __future__ import annotations

import re

import pytest
import torch
from _ray import ray_cluster  # noqa: F401
from _sft import metric_by_step, run_sft
from safetensors.torch import load_file

from swiftray import checkpoint as ckpt


def eval_loss_float64(checkpoint, val_spec: str) -> tuple[float, int]:
    """Token-mean cross-entropy of a full checkpoint on a validation set, restated in float64;
    and the number of loss tokens."""
    from transformers import AutoModelForCausalLM

    from swiftray.data.loader import load_datasets
    from swiftray.data.pipeline import encode_dataset
    from swiftray.data.template import Template
    from swiftray.models.loader import load_tokenizer

    # As the run loads --val_dataset: in file order, no shuffle.
    samples = encode_dataset(load_datasets([val_spec], shuffle=False), Template(load_tokenizer(str(checkpoint))),
                             name="check")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float64).eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for sample in samples:
            ids = torch.tensor([sample["input_ids"]])
            labels = torch.tensor(sample["labels"][1:])
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], dim=-1)
            keep = labels != -100
            total -= logp[keep].gather(-1, labels[keep].unsqueeze(-1)).sum().item()
            count += int(keep.sum())
    return total / count, count


def test_learning_output_tree_and_checkpoint_pruning(ray_cluster, tiny_model_dir, tmp_path):  # noqa: F811
    # Full training; "eval_num_tokens" stays constant, so with "higher is better" the first eval
    # remains the best: --save_total_limit 2 must then keep that old checkpoint and the last one.
    run = run_sft(tiny_model_dir, tmp_path / "out", "--train_type", "full", "--learning_rate", "2e-3",
                  "--dataset", "swiftray/arithmetic#64", "--val_dataset", "swiftray/arithmetic:test#12",
                  "--max_steps", 16, "--per_device_train_batch_size", 4, "--gradient_accumulation_steps", 1,
                  "--eval_steps", 4, "--save_steps", 4, "--save_total_limit", 2,
                  "--metric_for_best_model", "num_tokens", "--save_only_model", "true")

    assert run.parent == tmp_path / "out" and re.fullmatch(r"v0-\d{8}-\d{6}", run.name)
    eval_loss = metric_by_step(run, "eval/loss")
    assert sorted(eval_loss) == [4, 8, 12, 16]
    # Held-out loss falls at every eval and ends well below the first (about 5.8 after 4 steps).
    values = [eval_loss[s] for s in sorted(eval_loss)]
    assert all(b < a for a, b in zip(values, values[1:])) and values[-1] < values[0] - 1.0, eval_loss
    train_loss = metric_by_step(run, "train/loss")
    assert sorted(train_loss) == list(range(1, 17))

    # ms-swift's output tree.
    assert ckpt.read_args(run)["model"] == str(tiny_model_dir)
    assert list((run / "runs").glob("events.out.tfevents.*"))
    for png in ("train_loss", "train_lr", "eval_loss", "eval_token_acc"):
        assert (run / "images" / f"{png}.png").stat().st_size > 0
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-4", "checkpoint-16"]
    assert not list(run.glob(".checkpoint-*"))  # no staging folder left behind
    last = run / "checkpoint-16"
    for name in ("model.safetensors", "config.json", "tokenizer.json", "tokenizer_config.json", "args.json",
                 ckpt.TRAINER_STATE):
        assert (last / name).is_file(), name
    state = ckpt.read_trainer_state(last)
    assert state["global_step"] == 16 and state["best_model_checkpoint"] == str(run / "checkpoint-4")
    # --save_only_model: weights only, nothing to resume from.
    assert not (last / "train_state").exists() and not list(last.glob("rank_*.pt"))

    # The logged eval loss is the checkpoint's token-mean cross-entropy on the held-out rows.
    expected, num_tokens = eval_loss_float64(last, "swiftray/arithmetic:test#12")
    assert metric_by_step(run, "eval/num_tokens")[16] == num_tokens
    assert eval_loss[16] == pytest.approx(expected, rel=1e-5)


def test_resume_reaches_the_same_losses(ray_cluster, tiny_model_dir, tmp_path):  # noqa: F811
    # LoRA with dropout (so RNG state matters), a warm-up + cosine schedule over 8 steps,
    # gradient accumulation, and an epoch boundary (24 rows / 4 per step) after the resume point.
    flags = ["--train_type", "lora", "--learning_rate", "1e-3", "--warmup_ratio", "0.25", "--lora_dropout", "0.1",
             "--dataset", "swiftray/arithmetic#24", "--max_steps", 8, "--save_steps", 4,
             "--per_device_train_batch_size", 2, "--gradient_accumulation_steps", 2]
    full = run_sft(tiny_model_dir, tmp_path / "out", *flags)
    resumed = run_sft(tiny_model_dir, tmp_path / "out", *flags,
                      "--resume_from_checkpoint", full / "checkpoint-4")

    assert resumed != full and (full / "checkpoint-4" / "adapter_model.safetensors").is_file()
    assert (full / "checkpoint-4" / "train_state" / "train_state.json").is_file()
    assert (full / "checkpoint-4" / "train_state" / "rng_rank_0.safetensors").is_file()
    assert not [p for p in (full / "checkpoint-4").rglob("*") if p.suffix in (".pt", ".bin", ".pkl", ".distcp")]
    assert ckpt.read_trainer_state(full / "checkpoint-4")["data"] == {"epoch": 0, "position": 16}
    for key in ("train/loss", "train/grad_norm", "train/lr"):
        expected = {s: v for s, v in metric_by_step(full, key).items() if s > 4}
        got = metric_by_step(resumed, key)
        assert sorted(got) == [5, 6, 7, 8], key
        for step in got:
            assert got[step] == pytest.approx(expected[step], abs=1e-6, rel=1e-6), (key, step)
    # Later steps differ from earlier ones: the comparison above is not between constants.
    assert len({round(v, 6) for v in metric_by_step(full, "train/loss").values()}) == 8
    final_full = load_file(full / "checkpoint-8" / "adapter_model.safetensors")
    final_resumed = load_file(resumed / "checkpoint-8" / "adapter_model.safetensors")
    assert final_full.keys() == final_resumed.keys()
    for name, tensor in final_full.items():
        torch.testing.assert_close(final_resumed[name], tensor, atol=1e-6, rtol=1e-6)


def test_two_workers_match_one(ray_cluster, tiny_model_dir, tmp_path, monkeypatch):  # noqa: F811
    # NPROC_PER_NODE=2 through the CLI flags, DDP and FSDP2 (the backends' own tests cover ZeRO-2/3).
    # Same global batch (4 rows a step): 1 worker x 2 rows x 2 accumulation = 2 workers x 2 rows x 1.
    # 5 eval rows split 3/2 over the two workers.
    common = ["--train_type", "full", "--learning_rate", "1e-3", "--dataset", "swiftray/arithmetic#16",
              "--val_dataset", "swiftray/arithmetic:test#5", "--max_steps", 3, "--eval_steps", 3,
              "--per_device_train_batch_size", 2, "--save_strategy", "no", "--report_to", "none"]
    monkeypatch.setenv("NPROC_PER_NODE", "1")
    one = run_sft(tiny_model_dir, tmp_path / "one", *common, "--gradient_accumulation_steps", 2)
    monkeypatch.setenv("NPROC_PER_NODE", "2")
    runs = {name: run_sft(tiny_model_dir, tmp_path / name, *common, "--gradient_accumulation_steps", 1, *flags)
            for name, flags in [("ddp", []), ("fsdp2", ["--fsdp", "full_shard"])]}

    expected = metric_by_step(one, "train/loss")
    assert len(expected) == 3
    for name, run in runs.items():
        assert ckpt.read_args(run)["world_size"] == 2
        got = metric_by_step(run, "train/loss")
        assert got.keys() == expected.keys()
        for step in expected:
            assert got[step] == pytest.approx(expected[step], abs=1e-4), (name, step)
        assert metric_by_step(run, "eval/loss")[3] == pytest.approx(metric_by_step(one, "eval/loss")[3], abs=1e-4)
