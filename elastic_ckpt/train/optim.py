"""The default ``optimizer_fn`` and ``lr_scheduler_fn``: AdamW and the built-in schedule.

``optimizer_fn(model) -> torch.optim.Optimizer`` receives the sharded, materialized model
(call ``model.named_parameters()`` to build param groups); ``lr_scheduler_fn(optimizer) ->
LRScheduler | None`` receives that optimizer. The scheduler is stepped once per global step,
after the optimizer, and its state is checkpointed, so a resume at any world size continues it.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn as nn
from torch.optim.lr_scheduler import LambdaLR, LRScheduler

from elastic_ckpt.config import OptimConfig
from elastic_ckpt.train.schedule import lr_at

OptimizerFn = Callable[[nn.Module], torch.optim.Optimizer]
LRSchedulerFn = Callable[[torch.optim.Optimizer], "LRScheduler | None"]


def default_optimizer(model: nn.Module, optim: OptimConfig) -> torch.optim.Optimizer:
    """AdamW over every parameter with ``optim``'s lr, betas and weight decay."""
    return torch.optim.AdamW(model.parameters(), lr=optim.lr, betas=optim.betas,
                             weight_decay=optim.weight_decay)


def builtin_lr_scheduler(optimizer: torch.optim.Optimizer, optim: OptimConfig,
                         max_steps: int, step: int = 0) -> LRScheduler:
    """``optim.schedule`` (warm-up, then constant/cosine/linear decay) as a multiplier of each
    param group's own initial lr: a group built at 0.1x the lr stays at 0.1x throughout.
    During global step ``s`` (0-based) the factor is ``lr_at(s) / optim.lr``. ``step``: the
    next step to train (a resume); the groups must then hold ``initial_lr``."""
    peak = optim.lr

    def factor(s: int) -> float:
        return lr_at(s, optim, max_steps) / peak

    return LambdaLR(optimizer, factor, last_epoch=step - 1)
