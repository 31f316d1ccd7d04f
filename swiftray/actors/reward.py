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


def build_rewards(cfg: RewardConfig) -> Any:
    """The RewardSet of `cfg`, its plug-ins imported into this process."""
    from swiftray.rewards import REWARD_FUNCS, build_reward_funcs, load_external_plugins

    load_external_plugins(list(cfg.external_plugins))
    REWARD_FUNCS.update(cfg.registered or {})
    return build_reward_funcs(list(cfg.reward_funcs),
                              list(cfg.reward_weights) if cfg.reward_weights is not None else None, cfg.reward_kwargs)


class RewardActor(DistributedWorker):
    def setup(self, config: RewardConfig | dict[str, Any]) -> None:
        """Build the reward set of `config` (a RewardConfig; a dict of its fields works too). With a
        timeout, the functions run in a child process that is ended when one hangs (reward_timeout.py)."""
        from swiftray.rewards.registry import RewardSet

        cfg = as_config(RewardConfig, config)
        self.rewards = build_rewards(cfg)
        self.timeouts: list[list] = []  # [function, sample] the last call cut off
        if cfg.timeout_s:
            from swiftray.actors.reward_timeout import RewardProcess, TimedReward

            self.process = RewardProcess(cfg, cfg.timeout_s)
            self.process.start()
            proxies = [TimedReward(self.process, i, name, self.timeouts) for i, name in enumerate(self.rewards.names)]
            self.rewards = RewardSet(list(self.rewards.names), proxies, list(self.rewards.weights),
                                     nonfinite=self.rewards.nonfinite)

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
        self.timeouts.clear()
        batch.rewards, batch.reward_per_func = self.score(batch)
        batch.timings["score_s"] = time.time() - start
        self.last_timeouts = [[name, j, batch.group[j]] for name, j in self.timeouts]
        return batch

    def receipt_notes(self) -> dict[str, Any]:
        """The samples the last call's reward functions were cut off on: [function, sample, prompt in chunk]."""
        return {"reward_timeouts": getattr(self, "last_timeouts", [])}
