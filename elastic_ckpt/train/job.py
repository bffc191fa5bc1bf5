"""What a rank is given (``TrainJob``: config, datasets and the ``TrainSpec`` of the user's
builders) and what it reports (``StepMetrics``, ``EvalMetrics``, ``RankResult``)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import torch
import torch.nn as nn

from elastic_ckpt.config import ModelConfig, TrainConfig
from elastic_ckpt.train.events import RankEvent

LossFn = Callable[[nn.Module, Any], "torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]"]
"""``loss_fn(model, batch)`` -> the mean loss over the micro-batch (a 0-dim tensor), or
``(loss, {"name": 0-dim tensor, ...})``: each metric a mean over the micro-batch, averaged over
the global batch sample-weighted exactly like the loss."""


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """What one rank reports after each optimizer step (``step`` = steps completed)."""

    step: int
    loss: float
    """Mean loss over the global batch (identical on every rank)."""
    world_size: int
    samples: int
    tokens: int
    lr: float
    """The learning rate of the first param group during this step."""
    step_time_s: float
    rank: int
    sample_ids: tuple[int, ...]
    """The dataset indices this rank consumed in this step (the sample ledger)."""
    metrics: dict[str, float] = dataclasses.field(default_factory=dict)
    """The loss function's extra metrics, sample-weighted means over the global batch."""
    lrs: tuple[float, ...] = ()
    """The learning rate of every param group during this step."""


@dataclasses.dataclass(frozen=True)
class EvalMetrics:
    """One evaluation of the held-out set after ``step`` optimizer steps."""

    step: int
    loss: float
    """Sample-weighted mean loss over the evaluated samples (the same at every world size)."""
    metrics: dict[str, float]
    samples: int
    world_size: int
    eval_time_s: float


@dataclasses.dataclass(frozen=True)
class RankHooks:
    """How the runtime talks to a rank. Hooks run on the training thread and must not block.

    ``should_stop`` is polled once per step; the group agrees (any rank asking stops all) and
    stops after that step with a checkpoint.
    """

    should_stop: Callable[[], bool] = lambda: False
    on_step: Callable[[StepMetrics], None] = lambda metrics: None
    on_event: Callable[[RankEvent], None] = lambda event: None
    """Each ``train.events`` record the rank produces (restore, first step, checkpoints)."""
    on_eval: Callable[[EvalMetrics], None] = lambda metrics: None


@dataclasses.dataclass(frozen=True)
class RankResult:
    final_step: int
    stopped: bool
    """True when the run ended early because a stop was requested."""
    checkpoint: Any
    """The last ``CheckpointInfo`` this run committed or restored from (None: neither)."""
    restored_step: int | None


@dataclasses.dataclass(frozen=True)
class TrainSpec:
    """The user's builders, called on every rank at the right moment (None: the default).

    - ``model_fn() -> nn.Module``: build the model, normally or under
      ``torch.device("meta")`` (then materialized after sharding, the same at any W).
    - ``loss_fn(model, batch)``: see ``LossFn``.
    - ``parallelize_fn(model, mesh) -> nn.Module``: shard it (default
      ``default_parallelize``: ``fully_shard`` per block from ``shard_units``, then the root).
    - ``optimizer_fn(model) -> Optimizer``: called with the sharded, materialized model
      (default AdamW from ``config.optim``; any optimizer, any param groups).
    - ``lr_scheduler_fn(optimizer) -> LRScheduler | None``: stepped once per global step and
      checkpointed (default: ``config.optim.schedule`` as a multiplier of each group's lr).
    - ``eval_fn(model, batch)``: the eval loss, like ``loss_fn`` (default: ``loss_fn``).
    - ``collate_fn(samples) -> batch`` (default ``torch.utils.data.default_collate``).

    Everything must pickle (module-level functions or ``functools.partial``): it is shipped
    to each rank process.
    """

    model_fn: Callable[[], nn.Module] | None = None
    loss_fn: LossFn | None = None
    parallelize_fn: Callable | None = None
    optimizer_fn: Callable | None = None
    lr_scheduler_fn: Callable | None = None
    eval_fn: LossFn | None = None
    collate_fn: Callable[[list], Any] | None = None


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """What every rank needs to train; shipped to each rank process once (must pickle)."""

    config: TrainConfig
    spec: TrainSpec
    dataset: Any
    eval_dataset: Any | None = None

    def trainer(self, hooks: RankHooks, device: torch.device, held: Any = None,
                memory: Any = None):
        from elastic_ckpt.train.loop import RankTrainer

        return RankTrainer(self, hooks=hooks, device=device, held=held, memory=memory)


def default_model(config: TrainConfig) -> tuple[Callable[[], nn.Module], LossFn]:
    """``(model_fn, loss_fn)`` of the model ``config.model`` names (built-in GPT or HF)."""
    if isinstance(config.model, ModelConfig):
        from elastic_ckpt.train.model import build_gpt, lm_loss

        return functools.partial(build_gpt, config.model), lm_loss
    from elastic_ckpt.train.hf import build_hf_causal_lm, hf_lm_loss

    return functools.partial(build_hf_causal_lm, config.model), hf_lm_loss
