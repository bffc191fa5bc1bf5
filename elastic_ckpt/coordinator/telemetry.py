"""Run telemetry: what the coordinator learns (steps, evals, checkpoints, scaling events,
failures), fanned out to sinks.

- ``JsonlMetrics``: ``<run_dir>/metrics.jsonl``, one JSON object per line (the run-dir
  contract: ``type`` step | eval | checkpoint | failure, ``time`` in unix seconds).
- ``TensorBoardMetrics``: scalars in ``<run_dir>/tensorboard`` (``logging.tensorboard``).
- ``RayMetrics``: ``ray.util.metrics`` gauges, counters and a histogram named ``elastic_ckpt_*``,
  each tagged ``run`` (the basename of ``run_dir``). They are created in the coordinator actor
  and exported by its node's metrics agent (Prometheus text at the node's metrics export port,
  with Ray's ``ray_`` prefix), so they show in the Ray dashboard, Prometheus and Grafana.

A sink that fails (unwritable directory, full disk, ...) is warned about once, naming its file
and the cause, and is tried again on the next record; it never stops training.
"""

from __future__ import annotations

import json
import os
import threading
import time
import warnings
from collections.abc import Sequence
from typing import Any

from elastic_ckpt.config import TrainConfig
from elastic_ckpt.coordinator.events import ScalingEvent
from elastic_ckpt.errors import ConfigError
from elastic_ckpt.train import EvalMetrics, StepMetrics

METRICS_FILE = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
SAVE_SECONDS_BOUNDARIES = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0,
                           100.0, 250.0, 600.0)
"""Bucket bounds of ``elastic_ckpt_checkpoint_save_seconds`` (10 ms to 10 min, then +Inf)."""
GAUGE_REFRESH_S = 1.0
"""How often ``RayMetrics`` re-sets its gauges to their last values. Ray (2.60) exports a
Python gauge only when it is set, and its metrics agent drops a gauge that was not reported
for two report intervals (``RAY_metrics_report_interval_ms``, default 10 s): without this,
values that change rarely (checkpoint bytes, resize phases), or not at all during a resize,
would vanish from Prometheus."""


def run_name(config: TrainConfig) -> str:
    """The ``run`` tag of the Ray metrics: the last component of ``run_dir`` ("run" if none)."""
    return os.path.basename(os.path.normpath(config.run_dir)) if config.run_dir else "run"


def require_tensorboard() -> Any:
    """``torch.utils.tensorboard.SummaryWriter``; a ``ConfigError`` if it cannot be imported."""
    try:
        from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
    except Exception as exc:  # ImportError, or a broken install (protobuf mismatch)
        raise ConfigError(
            f"logging.tensorboard is true but TensorBoard cannot be imported ({exc}): "
            "pip install tensorboard (or elastic_ckpt[tensorboard])",
            field="logging.tensorboard") from exc
    return SummaryWriter


def _rate(amount: float, seconds: float) -> float:
    return amount / seconds if seconds > 0 else 0.0


def _event_step(e: ScalingEvent) -> int:
    """The training step a scaling event belongs to: where it began, else where it resumed."""
    return e.at_step if e.at_step is not None else (e.resumed_step or 0)


class Sink:
    """One destination of the telemetry; every record is a no-op unless overridden.
    ``target`` names what it writes to (for the warning when it fails)."""

    target = "?"

    def step(self, m: StepMetrics) -> None:
        pass

    def eval(self, m: EvalMetrics) -> None:
        pass

    def checkpoint(self, step: int, seconds: float, nbytes: int) -> None:
        pass

    def scaling_event(self, e: ScalingEvent) -> None:
        pass

    def failure(self, kind: str, at_step: int, message: str) -> None:
        pass

    def close(self) -> None:
        pass


class JsonlMetrics(Sink):
    """``metrics.jsonl``: appended line by line (opened on the first record, line-buffered,
    flushed after each line). A zero ``step_time_s`` gives rates of 0.0."""

    def __init__(self, path: str) -> None:
        self.path = self.target = path
        self._file = None

    def _write(self, record: dict[str, Any]) -> None:
        if self._file is None:
            os.makedirs(os.path.dirname(os.path.abspath(self.path)), exist_ok=True)
            self._file = open(self.path, "a", buffering=1)
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()

    def step(self, m: StepMetrics) -> None:
        self._write({"type": "step", "time": time.time(), "step": int(m.step),
                     "loss": float(m.loss), "lr": float(m.lr), "world_size": int(m.world_size),
                     "samples": int(m.samples), "tokens": int(m.tokens),
                     "tokens_per_s": _rate(m.tokens, m.step_time_s),
                     "samples_per_s": _rate(m.samples, m.step_time_s),
                     "step_time_s": float(m.step_time_s),
                     "metrics": {k: float(v) for k, v in m.metrics.items()}})

    def eval(self, m: EvalMetrics) -> None:
        self._write({"type": "eval", "time": time.time(), "step": int(m.step),
                     "loss": float(m.loss), "samples": int(m.samples),
                     "eval_time_s": float(m.eval_time_s),
                     "metrics": {k: float(v) for k, v in m.metrics.items()}})

    def checkpoint(self, step: int, seconds: float, nbytes: int) -> None:
        self._write({"type": "checkpoint", "time": time.time(), "step": int(step),
                     "seconds": float(seconds), "bytes": int(nbytes)})

    def failure(self, kind: str, at_step: int, message: str) -> None:
        self._write({"type": "failure", "time": time.time(), "at_step": int(at_step),
                     "kind": kind, "message": message})

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


class TensorBoardMetrics(Sink):
    """Scalars with the training step as ``global_step``: ``train/{loss,lr,tokens_per_s,
    world_size,<metric>}``, ``eval/{loss,<metric>}``, ``checkpoint/{save_s,bytes}``,
    ``scaling/{<phase>_s,total_s}`` (at the step the event began)."""

    def __init__(self, logdir: str) -> None:
        self.logdir = self.target = logdir
        self._summary_writer = require_tensorboard()
        self._writer = None

    def _scalars(self, step: int, values: dict[str, float]) -> None:
        if self._writer is None:
            self._writer = self._summary_writer(log_dir=self.logdir, flush_secs=10)
        for tag, value in values.items():
            self._writer.add_scalar(tag, float(value), global_step=int(step))

    def step(self, m: StepMetrics) -> None:
        self._scalars(m.step, {"train/loss": m.loss, "train/lr": m.lr,
                               "train/tokens_per_s": _rate(m.tokens, m.step_time_s),
                               "train/world_size": m.world_size,
                               **{f"train/{k}": v for k, v in m.metrics.items()}})

    def eval(self, m: EvalMetrics) -> None:
        self._scalars(m.step, {"eval/loss": m.loss,
                               **{f"eval/{k}": v for k, v in m.metrics.items()}})

    def checkpoint(self, step: int, seconds: float, nbytes: int) -> None:
        self._scalars(step, {"checkpoint/save_s": seconds, "checkpoint/bytes": nbytes})

    def scaling_event(self, e: ScalingEvent) -> None:
        values = {f"scaling/{phase}_s": s for phase, s in e.phases.items()}
        if e.total_s is not None:
            values["scaling/total_s"] = e.total_s
        self._scalars(_event_step(e), values)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None


class RayMetrics(Sink):
    """``ray.util.metrics``, every one tagged ``run``: gauges ``elastic_ckpt_step``, ``_loss``,
    ``_tokens_per_second``, ``_world_size``, ``_eval_loss``, ``_checkpoint_bytes`` and
    ``_resize_phase_seconds`` (tags ``kind``, ``phase``; the last completed event of that
    kind, ``phase="total"`` for its total), counters ``_samples_total`` and ``_tokens_total``
    (every step reported, re-run steps included) and ``_failures_total`` (tag ``kind``), and
    the histogram ``_checkpoint_save_seconds`` (``SAVE_SECONDS_BOUNDARIES``).

    A thread re-sets every gauge each ``refresh_s`` (see ``GAUGE_REFRESH_S``) until
    ``close()``; then they age out of the agent like any finished process's gauges."""

    target = "ray.util.metrics (elastic_ckpt_*)"

    def __init__(self, run: str, refresh_s: float = GAUGE_REFRESH_S) -> None:
        from ray.util import metrics  # noqa: PLC0415

        self.refresh_s = refresh_s
        self._last: dict[tuple[int, tuple], tuple[Any, float, dict | None]] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

        def make(cls, name: str, doc: str, *keys: str, **kw: Any):
            metric = cls(f"elastic_ckpt_{name}", doc, tag_keys=("run", *keys), **kw)
            metric.set_default_tags({"run": run})
            return metric

        gauge, counter = metrics.Gauge, metrics.Counter
        self.step_g = make(gauge, "step", "Optimizer steps completed (rank 0's last report).")
        self.loss = make(gauge, "loss", "Training loss of the last step (global batch mean).")
        self.tokens_per_second = make(gauge, "tokens_per_second",
                                      "Tokens per second of the last step.")
        self.world_size = make(gauge, "world_size", "Workers training the last step.")
        self.eval_loss = make(gauge, "eval_loss", "Loss of the last evaluation.")
        self.samples = make(counter, "samples_total", "Samples trained (re-run steps count).")
        self.tokens = make(counter, "tokens_total", "Tokens trained (re-run steps count).")
        self.save_seconds = make(metrics.Histogram, "checkpoint_save_seconds",
                                 "Seconds per committed checkpoint save (rank 0).",
                                 boundaries=list(SAVE_SECONDS_BOUNDARIES))
        self.checkpoint_bytes = make(gauge, "checkpoint_bytes",
                                     "Bytes of the last committed checkpoint.")
        self.phase_seconds = make(gauge, "resize_phase_seconds",
                                  "Seconds per phase of the last scaling event of each kind.",
                                  "kind", "phase")
        self.failures = make(counter, "failures_total", "Failures seen, by FailureKind.", "kind")

    def _set(self, gauge: Any, value: float, tags: dict[str, str] | None = None) -> None:
        with self._lock:
            gauge.set(value, tags=tags)
            self._last[(id(gauge), tuple(sorted((tags or {}).items())))] = (gauge, value, tags)
        if self._thread is None:
            self._thread = threading.Thread(target=self._refresh, daemon=True,
                                            name="elastic-ckpt-ray-gauges")
            self._thread.start()

    def _refresh(self) -> None:
        while not self._stop.wait(self.refresh_s):
            with self._lock:
                for gauge, value, tags in self._last.values():
                    try:
                        gauge.set(value, tags=tags)
                    except Exception:  # it failed in _set too, and was warned about there
                        pass

    def step(self, m: StepMetrics) -> None:
        self._set(self.step_g, m.step)
        self._set(self.loss, m.loss)
        self._set(self.tokens_per_second, _rate(m.tokens, m.step_time_s))
        self._set(self.world_size, m.world_size)
        if m.samples > 0:
            self.samples.inc(m.samples)
        if m.tokens > 0:
            self.tokens.inc(m.tokens)

    def eval(self, m: EvalMetrics) -> None:
        self._set(self.eval_loss, m.loss)

    def checkpoint(self, step: int, seconds: float, nbytes: int) -> None:
        self.save_seconds.observe(seconds)
        self._set(self.checkpoint_bytes, nbytes)

    def scaling_event(self, e: ScalingEvent) -> None:
        phases = dict(e.phases)
        if e.total_s is not None:
            phases["total"] = e.total_s
        for phase, seconds in phases.items():
            self._set(self.phase_seconds, seconds, {"kind": e.kind, "phase": phase})

    def failure(self, kind: str, at_step: int, message: str) -> None:
        self.failures.inc(1, tags={"kind": kind})

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)


class RunTelemetry:
    """The coordinator's one telemetry object: forwards each record to every sink; a sink's
    exception is caught and warned about once per sink (never raised)."""

    def __init__(self, sinks: Sequence[Sink]) -> None:
        self.sinks = list(sinks)
        self._warned: set[int] = set()

    @classmethod
    def from_config(cls, config: TrainConfig) -> RunTelemetry:
        """``metrics.jsonl`` (and TensorBoard with ``logging.tensorboard``) under
        ``run_dir`` when it is set, and Ray metrics. Raises ``ConfigError`` when TensorBoard
        is asked for but cannot be imported."""
        tensorboard = config.logging.tensorboard
        if tensorboard:
            require_tensorboard()
        factories: list[tuple[str, Any]] = []
        if config.run_dir:
            path = os.path.join(config.run_dir, METRICS_FILE)
            factories.append((path, lambda: JsonlMetrics(path)))
            if tensorboard:
                logdir = os.path.join(config.run_dir, TENSORBOARD_DIR)
                factories.append((logdir, lambda: TensorBoardMetrics(logdir)))
        factories.append((RayMetrics.target, lambda: RayMetrics(run_name(config))))
        sinks = []
        for target, factory in factories:
            try:
                sinks.append(factory())
            except Exception as exc:
                _warn(f"elastic_ckpt telemetry: cannot set up {target} ({exc!r}); the run "
                      "continues without it")
        return cls(sinks)

    def step(self, m: StepMetrics) -> None:
        self._each("step", m)

    def eval(self, m: EvalMetrics) -> None:
        self._each("eval", m)

    def checkpoint(self, step: int, seconds: float, nbytes: int) -> None:
        self._each("checkpoint", step, seconds, nbytes)

    def scaling_event(self, e: ScalingEvent) -> None:
        self._each("scaling_event", e)

    def failure(self, kind: str, at_step: int, message: str) -> None:
        self._each("failure", kind, at_step, message)

    def close(self) -> None:
        self._each("close")

    def _each(self, method: str, *args: Any) -> None:
        for sink in self.sinks:
            try:
                getattr(sink, method)(*args)
            except Exception as exc:
                if id(sink) not in self._warned:
                    self._warned.add(id(sink))
                    _warn(f"elastic_ckpt telemetry: writing {sink.target} failed in "
                          f"{method}() ({exc!r}); training continues, this sink is retried "
                          "on later records and its further errors are not reported")


def _warn(message: str) -> None:
    warnings.warn(message, RuntimeWarning, stacklevel=3)
