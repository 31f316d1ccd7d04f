"""One schedule for SFT and RL: when to log, evaluate and save, and which checkpoint is the best."""

from __future__ import annotations

from pathlib import Path

from swiftray.schedule import BestCheckpoint, Schedule


def due(schedule: Schedule, what: str) -> list[int]:
    return [s for s in range(1, schedule.total_steps + 1) if getattr(schedule, f"{what}_now")(s)]


def test_steps_epochs_and_no():
    s = Schedule(total_steps=10, steps_per_epoch=4, logging_steps=3, eval_steps=5, save_steps=4,
                 eval_strategy="epoch", save_strategy="steps")
    assert due(s, "log") == [1, 3, 6, 9, 10]  # the first step, every 3rd, and the last
    assert due(s, "eval") == [4, 8, 10]  # every epoch (4 steps), and the last
    assert due(s, "save") == [4, 8, 10]
    quiet = Schedule(total_steps=10, steps_per_epoch=4, logging_steps=3, logging_first_step=False,
                     eval_strategy="no", save_strategy="epoch")
    assert due(quiet, "log") == [3, 6, 9, 10] and due(quiet, "eval") == [] and due(quiet, "save") == [4, 8, 10]


def test_total_steps_round_epochs_up():
    assert Schedule.total_for(max_steps=-1, num_train_epochs=1.5, steps_per_epoch=3) == 5  # ceil(4.5)
    assert Schedule.total_for(max_steps=7, num_train_epochs=3, steps_per_epoch=3) == 7


def test_best_checkpoint_by_loss_or_by_reward(tmp_path: Path):
    by_loss = Schedule(total_steps=3, steps_per_epoch=3, metric_for_best_model="loss")
    best = BestCheckpoint()
    for step, loss in [(1, 2.0), (2, 1.0), (3, 1.5)]:
        best.update(by_loss, {"loss": loss}, tmp_path / f"checkpoint-{step}")
    assert best.metric == 1.0 and best.checkpoint.name == "checkpoint-2"
    by_reward = Schedule(total_steps=3, steps_per_epoch=3, metric_for_best_model="eval_reward")
    best = BestCheckpoint()
    for step, reward in [(1, 0.2), (2, 0.1), (3, 0.5)]:
        best.update(by_reward, {"reward": reward}, tmp_path / f"checkpoint-{step}")
    assert best.metric == 0.5 and best.checkpoint.name == "checkpoint-3"
    assert best.existing() is None  # never saved
    (tmp_path / "checkpoint-3").mkdir()
    assert best.existing() == tmp_path / "checkpoint-3"
