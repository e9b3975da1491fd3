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


# The default maximum learning rate, by the model's width (docs/uptrain.md, "Defaults"): Adam's
# update of a hidden matrix moves each output by about lr x fan-in, so the step that keeps that
# change the same size shrinks as 1/width (muP's rule for Adam). LR_WIDTH was measured on
# stories260K (width 64: best 5e-3) and a second TinyStories model (width 128); the clamp keeps
# tiny test models and very wide ones in the range where uptraining was seen to work.
LR_WIDTH = 0.32  # lr = LR_WIDTH / hidden_size
LR_MIN, LR_MAX = 1e-5, 5e-3


def default_lr(hidden_size: int) -> float:
    """The maximum LR uptraining uses without --lr: LR_WIDTH / hidden_size in [LR_MIN, LR_MAX]
    (5e-3 at 64, 2.5e-3 at 128, 7.8e-5 at Llama-3-8B's 4096, 3.9e-5 at 8192)."""
    return min(LR_MAX, max(LR_MIN, LR_WIDTH / hidden_size))
