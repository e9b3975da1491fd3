"""The WSD (warmup-stable-decay) learning-rate schedule of the cost-optimal GQA paper.

Linear warmup over the first `warmup` fraction of steps, constant at the maximum, then the last
`decay` fraction cosine-decayed down to `floor` (10% in the paper) of the maximum.
"""

from __future__ import annotations

import math


def wsd_factor(step: int, total: int, warmup: float = 0.1, decay: float = 0.2, floor: float = 0.1) -> float:
    """Multiplier of the maximum LR for optimizer step `step` (0-based) of `total` steps."""
    n_warm = int(round(warmup * total))
    n_decay = int(round(decay * total))
    if n_warm and step < n_warm:
        return (step + 1) / n_warm
    decay_start = total - n_decay
    if n_decay and step >= decay_start:
        progress = min(1.0, (step - decay_start + 1) / n_decay)
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return 1.0
