"""When a run logs, evaluates and saves, and which checkpoint is the best: one rule for SFT and RL.

A step is one optimizer step in SFT and one generation round in RL (which may hold several
optimizer steps: --steps_per_generation, --num_iterations). Step counts round up: the last step
of an epoch takes what is left (SFT) or the next epoch's first prompts (RL).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class Schedule:
    total_steps: int
    steps_per_epoch: int
    logging_steps: int = 5
    logging_first_step: bool = True
    eval_strategy: str = "steps"  # steps | epoch | no
    eval_steps: int = 500
    save_strategy: str = "steps"  # steps | epoch | no
    save_steps: int = 500
    save_total_limit: int | None = None
    save_only_model: bool = False
    metric_for_best_model: str = "loss"
    resume_from_checkpoint: str | None = None

    @staticmethod
    def total_for(max_steps: int, num_train_epochs: float, steps_per_epoch: int) -> int:
        """--max_steps when set, else ceil(epochs x steps per epoch)."""
        if max_steps > 0:
            return max_steps
        return max(1, math.ceil(num_train_epochs * steps_per_epoch))

    def _due(self, strategy: str, every: int, step: int) -> bool:
        if strategy == "no":
            return False
        if step == self.total_steps:
            return True
        period = self.steps_per_epoch if strategy == "epoch" else every
        return step % period == 0

    def log_now(self, step: int) -> bool:
        return (step == 1 and self.logging_first_step) or step % self.logging_steps == 0 or step == self.total_steps

    def eval_now(self, step: int) -> bool:
        return self._due(self.eval_strategy, self.eval_steps, step)

    def save_now(self, step: int) -> bool:
        return self._due(self.save_strategy, self.save_steps, step)

    @property
    def greater_is_better(self) -> bool:
        """Lower is better for losses, higher for everything else (accuracy, reward)."""
        return "loss" not in self.metric_for_best_model


@dataclass
class BestCheckpoint:
    """The best evaluation so far, by the schedule's metric, and the checkpoint that holds it."""

    metric: float | None = None
    checkpoint: Path | None = None

    def update(self, schedule: Schedule, eval_metrics: dict[str, float], checkpoint: Path) -> bool:
        """Record `eval_metrics` of the step whose checkpoint is (or will be) `checkpoint`; True if best."""
        value = eval_metrics.get(schedule.metric_for_best_model.removeprefix("eval_"))
        if value is None:
            return False
        better = self.metric is None or (value > self.metric if schedule.greater_is_better else value < self.metric)
        if better:
            self.metric, self.checkpoint = float(value), checkpoint
        return better

    def existing(self) -> Path | None:
        """The best checkpoint if it was saved (eval may run on steps that do not save)."""
        return self.checkpoint if self.checkpoint is not None and self.checkpoint.exists() else None
