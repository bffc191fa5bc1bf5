"""Learning rate as a pure function of the global step, so a resume at any world size
continues the schedule exactly."""

from __future__ import annotations

import math

from elastic_ckpt.config import OptimConfig


def lr_at(step: int, optim: OptimConfig, max_steps: int) -> float:
    """LR for global step ``step`` (0-based): linear warm-up, then constant/cosine/linear decay
    to ``min_lr_ratio * lr`` at ``max_steps``."""
    peak = optim.lr
    if optim.warmup_steps and step < optim.warmup_steps:
        return peak * (step + 1) / optim.warmup_steps
    if optim.schedule == "constant":
        return peak
    span = max(1, max_steps - optim.warmup_steps)
    progress = min(1.0, (step - optim.warmup_steps) / span)
    floor = optim.min_lr_ratio * peak
    if optim.schedule == "linear":
        return peak - (peak - floor) * progress
    return floor + 0.5 * (peak - floor) * (1.0 + math.cos(math.pi * progress))
