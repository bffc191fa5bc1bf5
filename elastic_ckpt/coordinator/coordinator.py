"""``Coordinator``: observes the cluster, asks the policies, and carries their decisions out on
a ``WorkerGroup`` — one state transition per loop iteration (see ``state.py``).

Runs inside one Ray actor (``ElasticTrainer`` starts it, pinned to the driver's node). Tensors
never pass through it: ranks exchange state through checkpoints and, on a resize, directly
between the processes of the new group (``checkpoint.peer``)."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import traceback
from typing import Any

import ray

from elastic_ckpt.checkpoint import CheckpointInfo
from elastic_ckpt.checkpoint.manager import latest_or_reason
from elastic_ckpt.config import TrainConfig
from elastic_ckpt.coordinator.cluster import ClusterView
from elastic_ckpt.coordinator.events import FailureNotice, ScalingEvent, Timeline
from elastic_ckpt.coordinator.inbox import ReportInbox
from elastic_ckpt.coordinator.policy import (
    Failure,
    FailureDecision,
    FailureKind,
    FailurePolicy,
    FailurePolicyProtocol,
    Observation,
    ResizeDecision,
    ScalingPolicy,
    ScalingPolicyProtocol,
)
from elastic_ckpt.coordinator.state import (
    TERMINAL,
    Failed,
    Finished,
    Recovering,
    Resizing,
    Running,
    Starting,
    State,
    Waiting,
    check_transition,
)
from elastic_ckpt.coordinator.telemetry import RunTelemetry
from elastic_ckpt.coordinator.worker_group import (
    GroupPoll,
    PlacementTimeout,
    Worker,
    WorkerGroup,
)
from elastic_ckpt.train import EvalMetrics, StepMetrics, TrainJob
from elastic_ckpt.train.events import (
    CheckpointCommitted,
    CheckpointFailed,
    FirstStep,
    Phase,
    RankEvent,
    Rendezvous,
    Restored,
)

POLL_INTERVAL_S = 0.1
CLUSTER_POLL_INTERVAL_S = 0.5
REPORT_GRACE_S = 2.0


_PEER_LOST = (FailureKind.WORKER_DIED, FailureKind.NODE_DIED, FailureKind.PREEMPTED)
"""Failures after which the other workers' processes are kept (their errors are collateral)."""


@dataclasses.dataclass(frozen=True)
class CoordinatorResult:
    final_step: int
    checkpoint: CheckpointInfo | None
    history: tuple[StepMetrics, ...]
    events: tuple[ScalingEvent, ...]
    sample_ledger: dict[int, tuple[int, ...]]
    error: str | None
    eval_history: tuple[EvalMetrics, ...] = ()


@dataclasses.dataclass(frozen=True)
class Progress:
    """What happened since the driver last asked (for its display)."""

    steps: list[StepMetrics]
    events: list[ScalingEvent]
    evals: list[EvalMetrics]
    failures: list[FailureNotice] = dataclasses.field(default_factory=list)


class Coordinator:
    def __init__(self, config: TrainConfig, job: TrainJob, record_samples: bool = False,
                 cluster: ClusterView | None = None, *,
                 scaling_policy: ScalingPolicyProtocol | None = None,
                 failure_policy: FailurePolicyProtocol | None = None) -> None:
        s = config.scaling
        self.config = config
        self.scaling = scaling_policy or ScalingPolicy(
            s.min_workers, s.max_workers, cooldown_s=s.cooldown_s, settle_s=s.settle_s)
        self.failure_policy = failure_policy or FailurePolicy(config.failure.max_failures)
        self.cluster = cluster or ClusterView()
        self.group = WorkerGroup(job, s.bundle, s.placement_strategy, s.use_gpu,
                                 sink=_current_actor(),
                                 actor_start_timeout_s=s.actor_start_timeout_s,
                                 process_group_timeout_s=s.process_group_timeout_s)
        self.timeline = Timeline(os.path.join(config.run_dir, "events.jsonl")
                                 if config.run_dir else None)
        self.telemetry = RunTelemetry.from_config(config)
        self.record_samples = record_samples
        self.failures = 0
        self.history: dict[int, StepMetrics] = {}
        self.eval_history: dict[int, EvalMetrics] = {}
        self.ledger: dict[int, dict[int, tuple[int, ...]]] = {}  # step -> rank -> sample ids
        self.last_step = 0
        self.restored_step: int | None = None
        self._capacity = (0, time.time())  # (value, when it last changed)
        self._last_cluster_poll = 0.0
        self._last_spare_try = 0.0
        self._drain_deadlines: dict[str, float | None] = {}  # draining node -> deadline
        self._released: dict[str, int] = {}  # node -> bundles of the group just torn down
        self._lock = threading.Lock()
        self._progress: list[StepMetrics] = []
        self._progress_events: list[ScalingEvent] = []
        self._progress_evals: list[EvalMetrics] = []
        self.inbox = ReportInbox()
        self._last_healthy = time.time()
        self._resumed_s: float | None = None  # when the current group made its first step
        self._last_failure: Failure | None = None
        self._progress_failures: list[FailureNotice] = []

    # -- public (Ray actor methods) ---------------------------------------------------------
    def run(self) -> CoordinatorResult:
        self._request_resources(self.config.scaling.max_workers)
        state: State = Starting(ScalingEvent("start", "initial start", from_workers=0))
        error = None
        try:
            while not isinstance(state, TERMINAL):
                new = self._transition(state)
                if new is not state:
                    check_transition(state, new)
                state = new
            if isinstance(state, Failed):
                error = state.error
        except Exception as exc:  # never a raw traceback out of run(): say what broke
            error = (f"the coordinator failed in state {type(state).__name__}: "
                     f"{type(exc).__name__}: {exc}. Last committed checkpoint: "
                     f"{self._latest_uri()}.\n{traceback.format_exc().rstrip()}")
        finally:
            self.telemetry.close()
            self.group.shutdown()
            self._request_resources(0)
        return CoordinatorResult(
            final_step=self.last_step, checkpoint=self._latest(),
            history=tuple(self.history[s] for s in sorted(self.history)),
            events=tuple(self.timeline.events),
            sample_ledger={s: tuple(i for r in sorted(v) for i in v[r])
                           for s, v in sorted(self.ledger.items())}, error=error,
            eval_history=tuple(self.eval_history[s] for s in sorted(self.eval_history)))

    def report(self, generation: int, rank: int, seq: int, kind: str, payload: Any) -> None:
        """Called by the ranks (fire-and-forget) after every step and event."""
        self.inbox.put(generation, rank, seq, kind, payload)

    def progress(self) -> Progress:
        """Steps, evals and completed events since the previous call (for the driver)."""
        with self._lock:
            out = Progress(self._progress, self._progress_events, self._progress_evals,
                           self._progress_failures)
            self._progress, self._progress_events, self._progress_evals = [], [], []
            self._progress_failures = []
        return out

    # -- transitions ------------------------------------------------------------------------
    def _transition(self, state: State) -> State:
        handler = {Starting: self._starting, Running: self._running, Resizing: self._resizing,
                   Recovering: self._recovering, Waiting: self._waiting}[type(state)]
        return handler(state)

    def _starting(self, state: Starting) -> State:
        event = state.event
        t0 = time.time()
        fresh = self.scaling.start_size(self._observe_capacity(force=True))
        # Nodes that joined since the decision count too (one resize for a burst of joins);
        # the decided target wins if the view still shows our just-freed bundles as used.
        size = max(filter(None, (state.target, fresh)), default=None)
        # Kept workers fit where they are; only the new ones are placed. Resource views lag
        # behind node deaths and freed bundles; try the size, and shrink to what the cluster
        # then reports if it does not fit.
        members = self.group.size
        adopted = self.group.adopt_spares(size - members) if size and size > members else []
        kept = self.group.size
        while size is not None and size > kept:
            try:
                self.group.place(size - kept, self.config.scaling.placement_timeout_s)
                break
            except PlacementTimeout:
                fits = self.scaling.start_size(self._observe_capacity(force=True))
                size = None if fits is None else min(fits, size - 1)
                if size is not None and size < self.scaling.min_workers:
                    size = None
        if size is None:
            return Waiting(event, since_s=time.time())
        if size < kept:
            self._release(self._surplus(kept - size))
        self._released = {}
        event.phases[Phase.PLACEMENT] = time.time() - t0
        self.inbox.reset()
        try:
            t1 = time.time()
            started = self.group.start_placed()
            event.phases[Phase.ACTORS] = time.time() - t1
            self.group.launch()
        except (ray.exceptions.RayError, ray.exceptions.GetTimeoutError) as exc:
            self.group.shutdown()
            return Recovering(Failure(FailureKind.WORKER_DIED, f"starting the group: {exc}"),
                              ScalingEvent("failure", str(exc), from_workers=0))
        event.to_workers = size
        event.details.update(workers_kept=size - started - len(adopted),
                             workers_started=started + len(adopted), spares=len(adopted))
        if adopted:  # started while the previous group trained: off the critical path
            event.details["spare_warm_s"] = round(max(w.warm_s or 0.0 for w in adopted), 3)
        return Running(event, started_s=time.time())

    def _running(self, state: Running) -> State:
        poll = self.group.poll()
        state = self._ingest(poll, state)
        if poll.failure is not None:
            return self._on_failure(poll.failure)
        if poll.finished:
            self._await_reports(poll, state.event, state.started_s)
            return Finished()
        obs = self._observation()
        decision = self.scaling.decide(obs)
        self._tend_spares(obs)
        if state.event is not None:
            # Not trained at the new size yet: only a drain notice cannot wait.
            if not (isinstance(decision, ResizeDecision) and decision.reason == "drain"):
                time.sleep(POLL_INTERVAL_S)
                return state
            state.event.message += " (superseded by a drain before its first step)"
            self.timeline.complete(state.event)
            self.telemetry.scaling_event(state.event)
        if isinstance(decision, ResizeDecision) and decision.reason == "scale_up":
            ready, warming = self.group.poll_spares()
            if warming or ready == 0:  # resize once the new processes are up
                time.sleep(POLL_INTERVAL_S)
                return state
            decision = dataclasses.replace(
                decision, num_workers=min(decision.num_workers, self.group.size + ready))
        if isinstance(decision, ResizeDecision):
            self.group.request_stop()
            return Resizing(decision, ScalingEvent(
                decision.reason, f"resize {self.group.size} -> {decision.num_workers}",
                from_workers=self.group.size, at_step=self.last_step,
                phases={Phase.DETECT: time.time() - self._capacity[1]}))
        time.sleep(POLL_INTERVAL_S)
        return state

    def _resizing(self, state: Resizing) -> State:
        event = state.event
        t0 = time.time()
        deadline = self._drain_deadline()
        stop_s = self.config.scaling.stop_timeout_s
        poll = self.group.wait_stopped(
            stop_s if deadline is None else max(1.0, min(stop_s, deadline - time.time())))
        self._await_reports(poll, event, t0)
        event.phases[Phase.DRAIN] = time.time() - t0
        if poll.failure is not None:
            return self._on_failure(poll.failure)
        if not poll.finished:
            return self._on_failure(Failure(FailureKind.PREEMPTED if deadline else
                                            FailureKind.WORKER_DIED,
                                            "ranks did not stop before the deadline"))
        event.at_step = self.last_step
        t1 = time.time()
        self._release([w for w in self.group.workers if w.node_id in self._drain_deadlines])
        event.phases[Phase.TEARDOWN] = time.time() - t1
        if self.last_step >= self.config.max_steps:
            return Finished()
        return Starting(event, target=state.decision.num_workers or None)

    def _recovering(self, state: Recovering) -> State:
        event = state.event
        t0 = time.time()
        failure, previous = state.failure, self._last_failure
        if failure.kind in _PEER_LOST:  # the others' collectives fail: keep their processes
            self._note_released(self.group.keep_survivors(
                self.config.failure.survivor_timeout_s))
        else:  # a training error may have left a process unusable (a CUDA error): replace all
            self._release(list(self.group.workers))
        event.phases[Phase.TEARDOWN] = time.time() - t0
        decision = self.failure_policy.decide(failure, self.failures, previous)
        self._last_failure = failure
        if self.failure_policy.counts(failure):
            self.failures += 1
        retrying = decision is not FailureDecision.RAISE
        with self._lock:
            self._progress_failures.append(FailureNotice(
                failure.kind.value, failure.message, self.last_step, retrying))
        self.telemetry.failure(failure.kind.value, self.last_step, failure.message)
        if retrying:
            return Starting(event)
        if failure.kind is FailureKind.FATAL:
            why = "a fatal error: retrying cannot fix it"
        elif self.failure_policy.is_repeat(failure, previous):
            why = ("the same error at the same step after restoring the same checkpoint "
                   "again: it is deterministic (a bug or bad input, not a flaky node), so it "
                   "is not retried")
        else:
            why = (f"{failure.kind.value}; {self.failures} failure(s), failure.max_failures="
                   f"{self.config.failure.max_failures}")
        return Failed(f"training failed ({why}). Last committed checkpoint: "
                      f"{self._latest_uri()}; fit() resumes from it when re-run.\n"
                      f"{failure.message}")

    def _waiting(self, state: Waiting) -> State:
        capacity = self._observe_capacity(force=True)
        if self.scaling.start_size(capacity) is not None:
            state.event.phases[Phase.WAIT_CAPACITY] = time.time() - state.since_s
            return Starting(state.event)
        timeout = self.config.scaling.capacity_timeout_s
        if timeout is not None and time.time() - state.since_s > timeout:
            return Failed(
                f"only {capacity} worker(s) of {self.config.scaling.bundle} fit, fewer than "
                f"scaling.min_workers={self.config.scaling.min_workers}, for "
                f"{timeout:.0f}s (scaling.capacity_timeout_s). Add capacity or lower "
                f"min_workers; the last committed checkpoint is {self._latest_uri()}.")
        # Right after a teardown the view still counts the freed bundles: look again soon.
        recent = time.time() - state.since_s < 5.0
        time.sleep(POLL_INTERVAL_S if recent else CLUSTER_POLL_INTERVAL_S)
        return state

    # -- helpers ----------------------------------------------------------------------------
    def _release(self, workers: list[Worker]) -> None:
        self.group.release(workers)
        self._note_released(workers)

    def _note_released(self, workers: list[Worker]) -> None:
        # Ray's resource view shows freed bundles as used for a moment after the kill; until
        # the next group is placed, count them as ours so the restart size is right (a dead
        # node's bundles drop out with the node).
        for worker in workers:
            self._released[worker.node_id] = self._released.get(worker.node_id, 0) + 1

    def _surplus(self, n: int) -> list[Worker]:
        """The ``n`` workers a shrink removes: those on draining nodes first, then the last
        ranks (rank 0's process stays where it is)."""
        order = sorted(enumerate(self.group.workers),
                       key=lambda rw: (rw[1].node_id not in self._drain_deadlines, -rw[0]))
        return [w for _, w in order[:n]]

    def _on_failure(self, failure: Failure) -> State:
        if failure.kind in (FailureKind.WORKER_DIED, FailureKind.NODE_DIED) and \
                self._draining_workers():
            failure = dataclasses.replace(failure, kind=FailureKind.PREEMPTED)
        return Recovering(failure, ScalingEvent(
            "failure", failure.message, from_workers=self.group.size, at_step=self.last_step,
            phases={Phase.DETECT: time.time() - self._last_healthy}))

    def _ingest(self, poll: GroupPoll, state: Running) -> Running:
        """Fold the ranks' reports into history, the ledger and the pending event's phases.
        Reports of earlier groups (still in flight when their group was killed) are dropped."""
        if poll.failure is None:
            self._last_healthy = time.time()
        event = state.event
        for rank, kind, payload in self.inbox.take(self.group.generation):
            if kind == "event":
                self._on_rank_event(rank, payload, event)
            elif kind == "step":
                self._on_step(rank, payload)
            elif kind == "eval" and rank == 0:
                self.eval_history[payload.step] = payload
                self.telemetry.eval(payload)
                with self._lock:
                    self._progress_evals.append(payload)
        if event is not None and Phase.FIRST_STEP in event.phases:
            event.resumed_step = self.restored_step
            self._resumed_s = time.time()
            self.timeline.complete(event)
            self.telemetry.scaling_event(event)
            with self._lock:
                self._progress_events.append(event)
            return Running(None, state.started_s)
        return state

    def _await_reports(self, poll: GroupPoll, event: ScalingEvent | None, t0: float) -> None:
        """Fold in every report the stopped ranks sent (their last step and the stop
        checkpoint); fire-and-forget calls may land just after ``run()`` returned."""
        deadline = time.time() + REPORT_GRACE_S
        while True:
            self._ingest(poll, Running(event, t0))  # the stop checkpoint -> phases["save"]
            sent = self.group.reports_sent
            if time.time() > deadline or all(
                    self.inbox.received(rank) >= n for rank, n in enumerate(sent)):
                return
            time.sleep(0.01)

    def _on_rank_event(self, rank: int, report: RankEvent,
                       event: ScalingEvent | None) -> None:
        """A rank's typed event: into the run record, the telemetry, and the phases and
        details of the scaling event it completes (rank 0's, but every rank's rendezvous)."""
        if isinstance(report, Rendezvous) and event is not None and report.groups_joined > 1:
            # the rank's own word that its process trained in an earlier group
            event.details["processes_reused"] = event.details.get("processes_reused", 0) + 1
        if rank != 0:
            return
        if isinstance(report, Restored):
            self._on_restore(report.step)
        if isinstance(report, CheckpointCommitted):  # every committed save, event or not
            self.telemetry.checkpoint(report.step, report.seconds, report.bytes)
        if isinstance(report, CheckpointFailed):  # a background save: training goes on
            self.telemetry.failure("checkpoint_save", report.step, report.error)
            with self._lock:
                self._progress_failures.append(FailureNotice(
                    "checkpoint_save", report.error, report.step, True))
        if event is None:
            return
        if isinstance(report, Rendezvous):
            event.phases[Phase.RENDEZVOUS] = report.seconds
        if isinstance(report, FirstStep):
            event.phases[Phase.FIRST_STEP] = report.seconds
        if isinstance(report, Restored):
            event.phases[Phase.LOAD] = report.seconds
            event.phases[Phase.BUILD] = report.build_seconds
            event.skipped_checkpoints = list(report.skipped)
            event.warnings = list(report.warnings)
            event.details.update(fsdp_units=report.fsdp_units,
                                 from_peers_bytes=report.from_peers_bytes,
                                 from_storage_bytes=report.from_storage_bytes,
                                 from_memory=report.from_memory)
            if report.init_from is not None:
                event.details.update(init_from=report.init_from,
                                     init_bytes_read=report.init_bytes_read,
                                     model_bytes=report.model_bytes)
        if isinstance(report, CheckpointCommitted) and event.kind != "start" \
                and not report.is_async:
            event.phases[Phase.SAVE] = report.seconds  # the stop save, its wait included

    def _on_step(self, rank: int, m: StepMetrics) -> None:
        if self.record_samples:
            self.ledger.setdefault(m.step, {})[rank] = m.sample_ids
        if rank == 0:
            self.history[m.step] = m
            self.last_step = max(self.last_step, m.step)
            self.telemetry.step(m)
            with self._lock:
                self._progress.append(m)

    def _on_restore(self, step: int) -> None:
        """A new group resumed from ``step``: later steps re-run, so forget their records."""
        self.restored_step = step
        self.last_step = step
        for s in [s for s in self.history if s > step]:
            del self.history[s]
        for s in [s for s in self.eval_history if s > step]:
            del self.eval_history[s]
        for s in [s for s in self.ledger if s > step]:
            del self.ledger[s]

    def _observe_capacity(self, force: bool = False) -> int:
        now = time.time()
        if force or now - self._last_cluster_poll >= CLUSTER_POLL_INTERVAL_S:
            self._last_cluster_poll = now
            snap = self.cluster.snapshot()
            self._drain_deadlines = {n.node_id: n.drain_deadline_s
                                     for n in snap.nodes if n.draining}
            own = dict(self.group.bundles_per_node())
            for node, n in self._released.items():
                own[node] = own.get(node, 0) + n
            capacity = snap.capacity(self.config.scaling.bundle, own)
            if capacity != self._capacity[0]:
                self._capacity = (capacity, now)
        return self._capacity[0]

    def _observation(self) -> Observation:
        capacity = self._observe_capacity()
        return Observation(
            now_s=time.time(), num_workers=self.group.size, capacity=capacity,
            capacity_changed_s=self._capacity[1],
            draining_workers=self._draining_workers(),
            last_resize_s=self._resumed_s)

    def _tend_spares(self, obs: Observation) -> None:
        """Start the processes a coming scale-up needs while the group trains (at most one
        placement attempt per cluster poll); drop spares on draining nodes."""
        draining = [w for w in self.group.spares if w.node_id in self._drain_deadlines]
        if draining:
            self.group.release_spares(draining)
            self._note_released(draining)
        missing = self.scaling.wanted(obs) - self.group.size - len(self.group.spares)
        now = time.time()
        if missing > 0 and now - self._last_spare_try >= CLUSTER_POLL_INTERVAL_S:
            self._last_spare_try = now
            if self.group.add_spares(missing, min(1.0, self.config.scaling.placement_timeout_s)):
                self._released = {}

    def _drain_deadline(self) -> float | None:
        """The earliest drain deadline among the group's nodes, as last observed."""
        deadlines = [d for node, d in self._drain_deadlines.items()
                     if node in self.group.node_ids and d]
        return min(deadlines) if deadlines else None

    def _draining_workers(self) -> int:
        return sum(n in self._drain_deadlines for n in self.group.node_ids)

    def _latest(self) -> CheckpointInfo | None:
        return latest_or_reason(self.config.checkpoint.uri)[0]

    def _latest_uri(self) -> str:
        return latest_or_reason(self.config.checkpoint.uri)[1]

    def _request_resources(self, num_workers: int) -> None:
        if not self.config.scaling.request_resources:
            return
        try:
            from ray.autoscaler.sdk import request_resources  # noqa: PLC0415

            request_resources(bundles=[dict(self.config.scaling.bundle)] * num_workers)
        except Exception:  # no autoscaler on this cluster: nothing to ask
            pass


def _current_actor() -> Any:
    """This process's actor handle when running as the coordinator actor (else None)."""
    if not ray.is_initialized():  # asking the runtime context would start a Ray
        return None
    try:
        return ray.get_runtime_context().current_actor
    except Exception:  # not inside an actor (unit tests drive the class directly)
        return None
