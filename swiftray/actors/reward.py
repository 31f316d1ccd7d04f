"""RewardActor: runs the reward functions on rollouts.

A plain actor (one call at a time, in the process's main thread), because
math-verify's timeout uses `signal.alarm`, which works only there.
"""

from __future__ import annotations

import time
from typing import Any

from swiftray.actors.configs import RewardConfig, as_config
from swiftray.actors.group import DistributedWorker
from swiftray.experience import RolloutBatch


class RewardActor(DistributedWorker):
    def setup(self, config: RewardConfig | dict[str, Any]) -> None:
        """Build the reward set of `config` (a RewardConfig; a dict of its fields works too)."""
        from swiftray.rewards import REWARD_FUNCS, build_reward_funcs, load_external_plugins

        cfg = as_config(RewardConfig, config)
        load_external_plugins(list(cfg.external_plugins))
        REWARD_FUNCS.update(cfg.registered or {})
        self.rewards = build_reward_funcs(list(cfg.reward_funcs),
                                          list(cfg.reward_weights) if cfg.reward_weights is not None else None,
                                          cfg.reward_kwargs)

    def score(self, batch: RolloutBatch) -> tuple[list[float], dict[str, list[float | None]]]:
        """(weighted total per completion, each function's values)."""
        extra = {"completion_ids": batch.completion_ids,
                 "completion_lengths": [len(c) for c in batch.completion_ids],
                 "prompt_ids": batch.prompt_ids, "truncated": batch.truncated}
        if "messages" in batch.columns:  # TRL's name: the conversation each completion answers
            extra["prompts"] = batch.columns["messages"]
        per_func, total = self.rewards.score(batch.completions, batch.columns, extra)
        return total, per_func

    def annotate(self, batch: RolloutBatch) -> RolloutBatch:
        """The same batch with `rewards` and `reward_per_func` filled in (passed on actor to actor)."""
        start = time.time()
        batch.rewards, batch.reward_per_func = self.score(batch)
        batch.timings["score_s"] = time.time() - start
        return batch
