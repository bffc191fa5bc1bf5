"""``ElasticTrainer``: wires config, model/data/loss, and the coordinator; returns ``Result``.

```python
result = ElasticTrainer(model_fn=..., dataset=..., loss_fn=..., config=TrainConfig(...)).fit()
```
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from elastic_ckpt.checkpoint import CheckpointInfo
from elastic_ckpt.config import TrainConfig, validate_config
from elastic_ckpt.coordinator import Coordinator, ScalingEvent
from elastic_ckpt.data import ParquetDataset, SyntheticLMDataset
from elastic_ckpt.errors import ConfigError, TrainingFailedError
from elastic_ckpt.train import StepMetrics, TrainJob, build_gpt, lm_loss

ProgressFn = Callable[[list[StepMetrics], list[ScalingEvent]], None]


@dataclasses.dataclass(frozen=True)
class Result:
    final_step: int
    checkpoint: CheckpointInfo | None
    """The last committed checkpoint."""
    history: tuple[StepMetrics, ...]
    """One record per step (step, loss, world_size, samples, tokens, lr, step_time_s)."""
    events: tuple[ScalingEvent, ...]
    """The scaling timeline: each start/resize/recovery with per-phase seconds, steps lost."""
    sample_ledger: dict[int, tuple[int, ...]]
    """step -> every sample id consumed in it (only with ``record_samples=True``)."""


def dataset_from_config(config: TrainConfig) -> Any:
    ds = config.data.dataset
    if ds.kind == "synthetic":
        return SyntheticLMDataset(ds.num_samples, ds.seq_len, ds.vocab_size, seed=config.seed)
    return ParquetDataset(ds.uri, column=ds.column, seq_len=ds.seq_len)


class ElasticTrainer:
    """Elastic FSDP2 training on the Ray cluster this process is connected to (or an embedded
    local one). ``model_fn()`` builds the module on every rank; ``dataset`` is map-style;
    ``loss_fn(model, batch)`` returns the mean loss of a micro-batch. Without them, the
    built-in GPT, the dataset named in ``config.data.dataset`` and ``lm_loss`` are used."""

    def __init__(self, model_fn: Callable[[], torch.nn.Module] | None = None,
                 dataset: Any | None = None, loss_fn: Callable | None = None,
                 config: TrainConfig | dict | None = None,
                 collate_fn: Callable[[list], Any] | None = None, *,
                 record_samples: bool = False, on_progress: ProgressFn | None = None) -> None:
        if config is None:
            config = TrainConfig()
        elif isinstance(config, dict):
            config = validate_config(config)
        if (model_fn is None) != (loss_fn is None):
            raise ConfigError("pass model_fn and loss_fn together (or neither, for the built-in "
                              "GPT and lm_loss)", field="model_fn")
        self.config = config
        self.job = TrainJob(
            config=config,
            model_fn=model_fn or functools.partial(build_gpt, config.model),
            dataset=dataset if dataset is not None else dataset_from_config(config),
            loss_fn=loss_fn or lm_loss, collate_fn=collate_fn)
        self.record_samples = record_samples
        self.on_progress = on_progress

    def fit(self) -> Result:
        """Train to ``max_steps`` across any resizes and failures. Raises
        ``TrainingFailedError`` (the last committed checkpoint stays intact)."""
        _ensure_ray()
        here = ray.get_runtime_context().get_node_id()
        coordinator = ray.remote(Coordinator).options(
            num_cpus=0, max_concurrency=4, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(self.config, self.job, self.record_samples)
        try:
            run = coordinator.run.remote()
            while not ray.wait([run], timeout=0.5)[0]:
                self._show(ray.get(coordinator.progress.remote()))
            self._show(ray.get(coordinator.progress.remote()))
            out = ray.get(run)
        finally:
            ray.kill(coordinator, no_restart=True)
        if out.error:
            raise TrainingFailedError(out.error)
        return Result(final_step=out.final_step, checkpoint=out.checkpoint, history=out.history,
                      events=out.events, sample_ledger=out.sample_ledger)

    def _show(self, progress: tuple[list[StepMetrics], list[ScalingEvent]]) -> None:
        if self.on_progress is not None and (progress[0] or progress[1]):
            self.on_progress(*progress)


def _ensure_ray() -> None:
    """Join the cluster named by RAY_ADDRESS (``ray job submit``), or start a local one."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(log_to_driver=True)
    else:
        ray.init(include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=True)
