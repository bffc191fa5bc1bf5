"""``ElasticTrainer``: wires config, model/data/loss, and the coordinator; returns ``Result``.

```python
result = ElasticTrainer(model_fn=..., dataset=..., loss_fn=..., config=TrainConfig(...)).fit()
```
"""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any, Callable

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from elastic_ckpt.checkpoint import CheckpointInfo
from elastic_ckpt.checkpoint.lease import LeaseKeeper, RootLease
from elastic_ckpt.checkpoint.manager import latest_or_reason
from elastic_ckpt.config import TrainConfig, validate_config
from elastic_ckpt.coordinator import Coordinator, ScalingEvent
from elastic_ckpt.coordinator.coordinator import Progress
from elastic_ckpt.coordinator.policy import FailurePolicyProtocol, ScalingPolicyProtocol
from elastic_ckpt.coordinator.telemetry import require_tensorboard
from elastic_ckpt.data import ParquetDataset, SyntheticLMDataset
from elastic_ckpt.errors import ConfigError, TrainingFailedError, TrainingStoppedError
from elastic_ckpt.train import EvalMetrics, StepMetrics, TrainJob, TrainSpec
from elastic_ckpt.trainer.preflight import Preflight, preflight
from elastic_ckpt.trainer.ray_session import RaySession, connect
from elastic_ckpt.trainer.run_paths import resolve_run_paths

ProgressFn = Callable[[Progress], None]
"""``on_progress(progress)``: called on the driver with the steps, evals and completed scaling
events since the previous call."""


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
    eval_history: tuple[EvalMetrics, ...] = ()
    """One record per evaluation (step, loss, metrics, samples)."""


def dataset_from_config(config: TrainConfig, ds: Any = None) -> Any:
    """The dataset ``ds`` (default ``config.data.dataset``) describes. A synthetic eval set
    (``eval.dataset``) draws from another seed than the training set."""
    ds = ds or config.data.dataset
    if ds.kind == "synthetic":
        seed = config.seed if ds is config.data.dataset else config.seed + 1_000_003
        return SyntheticLMDataset(ds.num_samples, ds.seq_len, ds.vocab_size, seed=seed)
    return ParquetDataset(ds.uri, column=ds.column, seq_len=ds.seq_len)


class ElasticTrainer:
    """Elastic FSDP2 training on the Ray cluster this process is connected to (or an embedded
    local one).

    ``model_fn()`` builds the module on every rank (normally or on the meta device);
    ``dataset`` is map-style; ``loss_fn(model, batch)`` returns the mean loss of a micro-batch
    (or ``(loss, {name: metric})``). Without them, the model ``config.model`` names, the
    dataset in ``config.data.dataset`` and its next-token loss are used. The builders
    ``parallelize_fn``, ``optimizer_fn``, ``lr_scheduler_fn``, ``eval_fn`` and ``collate_fn``
    are described on ``elastic_ckpt.train.TrainSpec``; ``eval_dataset`` (default
    ``config.eval.dataset``) is evaluated every ``eval.interval_steps`` and at the end.

    Relative local paths in the config are made absolute here, against this process's working
    directory (refused inside a ``ray job submit`` working-dir copy, which Ray deletes).
    ``ray_address`` picks the Ray cluster (``trainer.ray_session.ADDRESS_HELP``; default: Ray's
    convention); ``fit()`` says which one it joined or started, unless ``verbose=False``.
    ``scaling_policy`` / ``failure_policy`` replace the built-in ``ScalingPolicy`` and
    ``FailurePolicy`` (from ``config.scaling`` / ``config.failure``) with any object of the
    protocols in ``elastic_ckpt.coordinator.policy``; they are pickled to the coordinator
    actor and must stay pure (no Ray calls, no clock: the observation carries ``now_s``)."""

    def __init__(self, model_fn: Callable[[], torch.nn.Module] | None = None,
                 dataset: Any | None = None, loss_fn: Callable | None = None,
                 config: TrainConfig | dict | None = None,
                 collate_fn: Callable[[list], Any] | None = None, *,
                 parallelize_fn: Callable | None = None, optimizer_fn: Callable | None = None,
                 lr_scheduler_fn: Callable | None = None, eval_dataset: Any | None = None,
                 eval_fn: Callable | None = None, record_samples: bool = False,
                 on_progress: ProgressFn | None = None, ray_address: str | None = None,
                 verbose: bool = True, scaling_policy: ScalingPolicyProtocol | None = None,
                 failure_policy: FailurePolicyProtocol | None = None) -> None:
        if config is None:
            config = TrainConfig()
        elif isinstance(config, dict):
            config = validate_config(config)
        config = resolve_run_paths(config)
        if (model_fn is None) != (loss_fn is None):
            raise ConfigError("pass model_fn and loss_fn together (or neither, for the model "
                              "config.model names and its next-token loss)", field="model_fn")
        if eval_dataset is None and config.eval.dataset is not None:
            eval_dataset = dataset_from_config(config, config.eval.dataset)
        _check_eval(config, eval_dataset, eval_fn)
        if config.logging.tensorboard:
            require_tensorboard()  # a ConfigError here, not an actor death in fit()
        self.config = config
        spec = TrainSpec(model_fn=model_fn, loss_fn=loss_fn, parallelize_fn=parallelize_fn,
                         optimizer_fn=optimizer_fn, lr_scheduler_fn=lr_scheduler_fn,
                         eval_fn=eval_fn, collate_fn=collate_fn)
        self.job = TrainJob(
            config=config, spec=spec,
            dataset=dataset if dataset is not None else dataset_from_config(config),
            eval_dataset=eval_dataset)
        self.record_samples = record_samples
        self.scaling_policy = scaling_policy
        self.failure_policy = failure_policy
        self.on_progress = on_progress
        self.ray_address = ray_address
        self.verbose = verbose
        self.preflight: Preflight | None = None
        """What the checks before the first step found (set by ``fit``)."""
        self.ray_session: RaySession | None = None
        """Which Ray ``fit`` ran on."""
        self.coordinator_name: str | None = None
        """The Ray actor name of the running coordinator (set by ``fit``)."""
        self._stop_reason: str | None = None

    def stop(self, reason: str = "ElasticTrainer.stop() was called") -> None:
        """Stop a running ``fit()`` from another thread or a signal handler (it only sets a
        flag): within half a second ``fit()`` kills the coordinator and with it every worker,
        releases the checkpoint root's lease and raises ``TrainingStoppedError`` naming the
        latest committed checkpoint (nothing is committed after the stop; the steps since
        that checkpoint are lost, and ``fit()`` again resumes from it)."""
        self._stop_reason = reason

    def fit(self) -> Result:
        """Train to ``max_steps`` across any resizes and failures. Before any worker starts,
        the checkpoint root and ``run_dir`` are probed and the datasets opened (typed errors
        naming the field). Raises ``TrainingFailedError`` (the last committed checkpoint stays
        intact), or ``TrainingStoppedError`` after ``stop()``."""
        self._stop_reason = None
        self.preflight = preflight(self.config, self.job.dataset, self.job.eval_dataset)
        # Named, so an operator finds it in `ray list actors`, the dashboard and the lease.
        self.coordinator_name = f"elastic_ckpt-coordinator-{uuid.uuid4().hex[:8]}"
        keeper = self._take_lease()
        try:
            return self._fit(keeper)
        finally:
            if keeper is not None:
                keeper.stop()

    def _take_lease(self) -> LeaseKeeper | None:
        """One writer per checkpoint root (``checkpoint.lease_timeout_s``): refused, naming
        the other job, before anything starts."""
        timeout = self.config.checkpoint.lease_timeout_s
        if timeout is None:
            return None
        lease = RootLease(self.config.checkpoint.uri, self.coordinator_name, timeout)
        lease.acquire()
        return LeaseKeeper(lease).start()

    def _fit(self, keeper: LeaseKeeper | None) -> Result:
        self.ray_session = connect(self.ray_address)
        self._say(self.ray_session.describe())
        self._say(self.preflight.describe())
        here = ray.get_runtime_context().get_node_id()
        coordinator = ray.remote(Coordinator).options(
            name=self.coordinator_name, num_cpus=0, max_concurrency=4, max_restarts=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(here, soft=False),
        ).remote(self.config, self.job, self.record_samples,
                 scaling_policy=self.scaling_policy, failure_policy=self.failure_policy)
        try:
            run = coordinator.run.remote()
            while not ray.wait([run], timeout=0.5)[0]:
                self._show(ray.get(coordinator.progress.remote()))
                if keeper is not None and keeper.lost is not None:
                    raise TrainingFailedError(str(keeper.lost))  # the finally kills the run
                if self._stop_reason is not None:
                    raise self._stopped()  # the finally kills the run
            self._show(ray.get(coordinator.progress.remote()))
            out = ray.get(run)
        except ray.exceptions.RayError as exc:
            raise TrainingFailedError(self._coordinator_lost(exc)) from None
        finally:
            ray.kill(coordinator, no_restart=True)
        if out.error:
            raise TrainingFailedError(out.error)
        return Result(final_step=out.final_step, checkpoint=out.checkpoint, history=out.history,
                      events=out.events, sample_ledger=out.sample_ledger,
                      eval_history=out.eval_history)

    def _stopped(self) -> TrainingStoppedError:
        last = latest_or_reason(self.config.checkpoint.uri)[1]
        return TrainingStoppedError(
            f"training stopped ({self._stop_reason}): the run's coordinator and workers were "
            f"stopped and the checkpoint root's lease released; last committed checkpoint: "
            f"{last}. Run it again to resume from there.", reason=self._stop_reason)

    def _show(self, progress: Progress) -> None:
        if self.on_progress is not None and (progress.steps or progress.events
                                             or progress.evals or progress.failures):
            self.on_progress(progress)

    def _say(self, line: str) -> None:
        if self.verbose:
            print(f"elastic_ckpt: {line}", flush=True)

    def _coordinator_lost(self, exc: BaseException) -> str:
        """The error text when the coordinator actor itself is gone (cancelled, killed, its
        node or the cluster shut down), which no retry inside the run can cover."""
        text = str(exc).strip()
        first = (text.splitlines() or [type(exc).__name__])[0]
        if "creation task" in text:  # Coordinator(...) itself raised: that error is the story
            return (f"the run's coordinator could not be created on this node: {text}")
        last = latest_or_reason(self.config.checkpoint.uri)[1]
        where = self.ray_session.describe() if self.ray_session else "Ray"
        return (f"the run's coordinator actor stopped before training ended "
                f"({type(exc).__name__}: {first}). This run {where}; a coordinator is "
                "cancelled or dies when that cluster shuts down or its node is lost, or when "
                "another job's driver stops a cluster this run joined. Start a private local "
                "Ray with ray_address='local' (jobs/train.py --ray-address local) or submit "
                f"the job to a cluster of its own. Last committed checkpoint: {last}; "
                "fit() resumes from it when re-run.")


def _check_eval(config: TrainConfig, eval_dataset: Any, eval_fn: Callable | None) -> None:
    """Eval settings that would silently do nothing, or fail at the first eval."""
    if eval_dataset is None:
        if eval_fn is not None or config.eval.interval_steps is not None:
            what = "eval_fn" if eval_fn is not None else "eval.interval_steps"
            raise ConfigError(f"{what} is set but there is no eval dataset: pass "
                              "ElasticTrainer(eval_dataset=...) or set eval.dataset",
                              field="eval.dataset")
        return
    if len(eval_dataset) == 0:
        raise ConfigError(f"the eval dataset ({type(eval_dataset).__name__}) is empty",
                          field="eval.dataset")
