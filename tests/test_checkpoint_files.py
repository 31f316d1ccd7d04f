"""The output tree: run versions, atomic checkpoints, pruning, and the metric logs."""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import time

from swiftray import checkpoint as ckpt
from swiftray.tracking import Tracker


def test_run_dirs_are_versioned(tmp_path):
    first = ckpt.make_run_dir(str(tmp_path))
    second = ckpt.make_run_dir(str(tmp_path))
    assert first.name.startswith("v0-") and second.name.startswith("v1-")
    assert len(first.name) == len("v0-20260101-000000")


def _slow_save(run_dir: str) -> None:
    staging = ckpt.staging_dir(run_dir, 20)
    (staging / "model.safetensors").write_bytes(b"x" * 100)
    time.sleep(60)  # killed here, mid-save
    ckpt.commit_checkpoint(staging, ckpt.checkpoint_dir(run_dir, 20))


def test_a_save_killed_midway_leaves_the_previous_checkpoint_latest(tmp_path):
    run = tmp_path
    done = ckpt.staging_dir(run, 10)
    (done / "model.safetensors").write_bytes(b"ok")
    ckpt.commit_checkpoint(done, ckpt.checkpoint_dir(run, 10))
    proc = mp.get_context("spawn").Process(target=_slow_save, args=(str(run),))
    proc.start()
    deadline = time.time() + 30
    while not (run / ".checkpoint-20.tmp" / "model.safetensors").exists() and time.time() < deadline:
        time.sleep(0.05)
    proc.kill()
    proc.join()
    assert ckpt.latest_checkpoint(run) == run / "checkpoint-10"
    assert (run / "checkpoint-10" / "model.safetensors").read_bytes() == b"ok"
    # the next save at the same step clears the leftover and completes
    again = ckpt.staging_dir(run, 20)
    assert not (again / "model.safetensors").exists()
    ckpt.commit_checkpoint(again, ckpt.checkpoint_dir(run, 20))
    assert ckpt.latest_checkpoint(run) == run / "checkpoint-20"


def test_prune_keeps_best_and_latest(tmp_path):
    for step in (10, 20, 30, 40):
        s = ckpt.staging_dir(tmp_path, step)
        ckpt.commit_checkpoint(s, ckpt.checkpoint_dir(tmp_path, step))
    removed = ckpt.prune_checkpoints(tmp_path, 2, best=tmp_path / "checkpoint-20")
    assert sorted(p.name for p in removed) == ["checkpoint-10", "checkpoint-30"]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["checkpoint-20", "checkpoint-40"]


def test_write_json_is_atomic_and_readable(tmp_path):
    path = tmp_path / "state.json"
    ckpt.write_json(path, {"global_step": 3})
    ckpt.write_json(path, {"global_step": 4})
    assert json.loads(path.read_text()) == {"global_step": 4}
    assert not [p for p in os.listdir(tmp_path) if p.endswith(".tmp")]


def test_tracker_writes_jsonl_tensorboard_and_pngs(tmp_path):
    tracker = Tracker(tmp_path, ["tensorboard"], total_steps=3)
    for step in (1, 2, 3):
        tracker.log(step, {"loss": 1.0 / step, "lr": 1e-4}, prefix="train/", echo=False)
        tracker.advance()
    tracker.log_table("completions", [{"prompt": "1+1", "completion": "2", "reward": 1.0}])
    pngs = tracker.close()
    lines = [json.loads(line) for line in (tmp_path / "logging.jsonl").read_text().splitlines()]
    assert [line["step"] for line in lines] == [1, 2, 3] and lines[2]["train/loss"] == 1 / 3
    assert {p.name for p in pngs} == {"train_loss.png", "train_lr.png"}
    assert all(p.stat().st_size > 1000 for p in pngs)
    assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path / "runs"))
    assert json.loads((tmp_path / "completions.jsonl").read_text())["completion"] == "2"
