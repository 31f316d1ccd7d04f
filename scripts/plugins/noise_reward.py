"""The demo's control: a reward that ignores the completion (seeded uniform noise).

GRPO driven by it must not raise held-out accuracy; if it did, the demo's gain would
come from something other than the accuracy reward.
"""

import random

from swiftray.rewards import register_reward

_rng = random.Random(0)


@register_reward("demo_noise")
def demo_noise(completions, **kwargs):
    return [_rng.random() for _ in completions]
