"""The run's prompt ledger: which prompts (by index in the training set) and which weight versions went
into each step, written to `<run folder>/ledger.jsonl`, one line per finished step.

    {"step": 3, "policy_version": 2, "prompts": [17, 4, ...], "chunks": [{"chunk": 0, "prompts": [17, 4],
     "seed": 45, "rollout_version": 2, "node": "...", "issues": 2, "resample": 0}, ...], "replay": 0}

A chunk issued more than once (its engine died) is listed once, with the number of times it was issued;
only its last, finished issue reached training. A step redone after the policy went back to a checkpoint
is written again with `replay` counting the redos: the last line of each step is the one that stands.
`check` reads a ledger back and returns the problems it finds: a step missing, a prompt in no step's
chunks that the sampler handed out, a prompt twice in one step.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

LEDGER = "ledger.jsonl"


class Ledger:
    """Collects each step's chunks as they finish; `close(step)` writes the step's line."""

    def __init__(self, run_dir: Path | None):
        self.path = Path(run_dir) / LEDGER if run_dir is not None else None
        self.pending: dict[int, list[dict[str, Any]]] = {}
        self.replays: Counter[int] = Counter()

    def add(self, step: int, chunks: list[dict[str, Any]]) -> None:
        self.pending.setdefault(step, []).extend(chunks)

    def close(self, step: int, policy_version: int, faults: list[dict[str, Any]] | None = None) -> dict[str, Any]:
        chunks = self.pending.pop(step, [])
        line = {"step": step, "policy_version": policy_version,
                "prompts": [i for c in chunks for i in c["prompts"]], "chunks": chunks,
                "replay": self.replays[step], "faults": faults or []}
        if self.path is not None:
            with self.path.open("a", encoding="utf-8") as f:
                f.write(json.dumps(line) + "\n")
        return line

    def rewind(self, step: int) -> None:
        """The policy went back to the state after `step`: what later steps collected is void, and the
        steps after it will be written again (counted as replays)."""
        for later in [s for s in self.pending if s > step]:
            del self.pending[later]
        if self.path is not None and self.path.exists():
            for line in read(self.path):
                if line["step"] > step:
                    self.replays[line["step"]] = max(self.replays[line["step"]], line["replay"] + 1)


def read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


def standing(path: Path) -> dict[int, dict[str, Any]]:
    """Each step's line that stands (the last one written for it)."""
    return {line["step"]: line for line in read(path)}


def check(path: Path, expected: dict[int, list[int]] | None = None, first_step: int = 1,
          last_step: int | None = None) -> list[str]:
    """Problems with a ledger: steps missing between first_step and last_step, a prompt used twice in a
    step, a resample-free step whose prompts differ from `expected[step]` (e.g. a fault-free run's)."""
    steps = standing(path)
    problems = []
    last = last_step if last_step is not None else max(steps, default=0)
    for step in range(first_step, last + 1):
        line = steps.get(step)
        if line is None:
            problems.append(f"step {step}: not in the ledger")
            continue
        twice = sorted(i for i, n in Counter(line["prompts"]).items() if n > 1)
        if twice and not any(c.get("resample") for c in line["chunks"]):
            problems.append(f"step {step}: prompts {twice} used more than once")
        if expected is not None and step in expected and Counter(line["prompts"]) != Counter(expected[step]):
            lost = sorted((Counter(expected[step]) - Counter(line["prompts"])).elements())
            extra = sorted((Counter(line["prompts"]) - Counter(expected[step])).elements())
            problems.append(f"step {step}: prompts lost {lost}, prompts extra {extra}")
    return problems
