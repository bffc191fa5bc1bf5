"""``RunRecord``: what the run has done so far, as the ranks reported it: kept for the result and
handed to the driver as it happens.

Rank 0's steps and evals (by step), every rank's sample ids per step (the sample ledger, when
asked for), the last step and the step the current group restored. A restore forgets the
records of later steps: they run again. Steps, evals, completed scaling events and failure
notices also wait in a buffer until the driver's next ``Coordinator.progress`` call, which runs
on another of the actor's threads and takes them (``take_progress``).
"""

from __future__ import annotations

import dataclasses
import threading

from elastic_ckpt.coordinator.events import FailureNotice, ScalingEvent
from elastic_ckpt.train import EvalMetrics, StepMetrics


@dataclasses.dataclass(frozen=True)
class Progress:
    """What happened since the driver last asked (for its display)."""

    steps: list[StepMetrics]
    events: list[ScalingEvent]
    evals: list[EvalMetrics]
    failures: list[FailureNotice] = dataclasses.field(default_factory=list)


class RunRecord:
    def __init__(self, record_samples: bool = False) -> None:
        self.record_samples = record_samples
        self.history: dict[int, StepMetrics] = {}
        self.eval_history: dict[int, EvalMetrics] = {}
        self.ledger: dict[int, dict[int, tuple[int, ...]]] = {}  # step -> rank -> sample ids
        self.last_step = 0
        self.restored_step: int | None = None
        self._lock = threading.Lock()  # the progress buffers: take_progress runs on another thread
        self._progress: list[StepMetrics] = []
        self._progress_events: list[ScalingEvent] = []
        self._progress_evals: list[EvalMetrics] = []
        self._progress_failures: list[FailureNotice] = []

    def step(self, rank: int, m: StepMetrics) -> None:
        """A rank's step: its sample ids into the ledger; rank 0's into the history."""
        if self.record_samples:
            self.ledger.setdefault(m.step, {})[rank] = m.sample_ids
        if rank == 0:
            self.history[m.step] = m
            self.last_step = max(self.last_step, m.step)
            with self._lock:
                self._progress.append(m)

    def eval(self, m: EvalMetrics) -> None:
        """Rank 0's eval."""
        self.eval_history[m.step] = m
        with self._lock:
            self._progress_evals.append(m)

    def event(self, event: ScalingEvent) -> None:
        """A completed scaling event, for the driver (the timeline keeps them all)."""
        with self._lock:
            self._progress_events.append(event)

    def failure(self, notice: FailureNotice) -> None:
        with self._lock:
            self._progress_failures.append(notice)

    def restore(self, step: int) -> None:
        """A new group resumed from ``step``: later steps re-run, so forget their records."""
        self.restored_step = step
        self.last_step = step
        for s in [s for s in self.history if s > step]:
            del self.history[s]
        for s in [s for s in self.eval_history if s > step]:
            del self.eval_history[s]
        for s in [s for s in self.ledger if s > step]:
            del self.ledger[s]

    def take_progress(self) -> Progress:
        """Steps, evals, completed events and failures since the previous call."""
        with self._lock:
            out = Progress(self._progress, self._progress_events, self._progress_evals,
                           self._progress_failures)
            self._progress, self._progress_events, self._progress_evals = [], [], []
            self._progress_failures = []
        return out

    def steps(self) -> tuple[StepMetrics, ...]:
        return tuple(self.history[s] for s in sorted(self.history))

    def evals(self) -> tuple[EvalMetrics, ...]:
        return tuple(self.eval_history[s] for s in sorted(self.eval_history))

    def sample_ledger(self) -> dict[int, tuple[int, ...]]:
        """Step -> the sample ids of every rank in it, in rank order."""
        return {s: tuple(i for r in sorted(v) for i in v[r])
                for s, v in sorted(self.ledger.items())}
