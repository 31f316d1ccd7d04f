"""The driver: the only place that sequences roles. `sft.py` (one role) and `rl.py` (all of them)."""

from swiftray.controller.sft import run_sft


def run_rlhf(args):  # imported lazily: the RL roles pull in more dependencies
    from swiftray.controller.rl import run_rlhf as _run

    return _run(args)


__all__ = ["run_rlhf", "run_sft"]
