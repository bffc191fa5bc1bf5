"""``Coordinator``: observes the cluster, asks the policies, and carries their decisions out on
a ``WorkerGroup`` — one state transition per loop iteration (see ``state.py``).

It manages the group: which workers a transition keeps, starts, adopts as spares or releases.
The rest lives in rooms of their own: the ranks' reports arrive in a ``ReportInbox``, what the
run has done is kept in a ``RunRecord``, and what the cluster has room for comes from a
``CapacityMonitor``.

Runs inside one Ray actor (``ElasticTrainer`` starts it, pinned to the driver's node). Tensors
never pass through it: ranks exchange state through checkpoints and, on a resize, directly
between the processes of the new group (``checkpoint.peer``)."""

from __future__ import annotations

import dataclasses
import os
import time
import traceback
from typing import Any

import ray

from elastic_ckpt.checkpoint import CheckpointInfo
from elastic_ckpt.checkpoint.manager import latest_or_reason
from elastic_ckpt.config import TrainConfig
from elastic_ckpt.coordinator.capacity import CLUSTER_POLL_INTERVAL_S, CapacityMonitor
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
from elastic_ckpt.coordinator.record import Progress, RunRecord
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
from elastic_ckpt.coordinator.watchdog import Hang, HangWatchdog
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
_HANG_PING_S = 3.0  # a process that does not answer a ping in this long is stuck
REPORT_GRACE_S = 2.0


_PEER_LOST = (FailureKind.WORKER_DIED, FailureKind.NODE_DIED, FailureKind.PREEMPTED,
              FailureKind.HANG)
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
        self.group = WorkerGroup(job, s.bundle, s.placement_strategy, s.use_gpu,
                                 sink=_current_actor(),
                                 actor_start_timeout_s=s.actor_start_timeout_s,
                                 process_group_timeout_s=config.process_group_timeout_s)
        self.capacity = CapacityMonitor(cluster or ClusterView(), s.bundle, self.group)
        self.timeline = Timeline(os.path.join(config.run_dir, "events.jsonl")
                                 if config.run_dir else None)
        self.telemetry = RunTelemetry.from_config(config)
        self.record = RunRecord(record_samples)
        self.inbox = ReportInbox()
        self.failures = 0
        self._last_spare_try = 0.0
        self._last_healthy = time.time()
        self._resumed_s: float | None = None  # when the current group made its first step
        self._last_failure: Failure | None = None
        f = config.failure
        self.watchdog = HangWatchdog(f.step_timeout_s, f.first_step_timeout_s)

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
            final_step=self.record.last_step, checkpoint=self._latest(),
            history=self.record.steps(), events=tuple(self.timeline.events),
            sample_ledger=self.record.sample_ledger(), error=error,
            eval_history=self.record.evals())

    def report(self, generation: int, rank: int, seq: int, kind: str, payload: Any) -> None:
        """Called by the ranks (fire-and-forget) after every step and event."""
        self.inbox.put(generation, rank, seq, kind, payload)

    def progress(self) -> Progress:
        """Steps, evals and completed events since the previous call (for the driver)."""
        return self.record.take_progress()

    def processes(self) -> dict[str, list[tuple[str, int]]]:
        """Where the run's processes are, for an operator or a fault injector: ``members``
        (the group, in rank order) and ``spares``, each ``(node id, pid)``; a worker still
        starting is left out."""
        def where(workers: list) -> list[tuple[str, int]]:
            return [(w.node_id, w.pid) for w in list(workers) if w.pid]
        return {"members": where(self.group.workers), "spares": where(self.group.spares)}

    # -- transitions ------------------------------------------------------------------------
    def _transition(self, state: State) -> State:
        handler = {Starting: self._starting, Running: self._running, Resizing: self._resizing,
                   Recovering: self._recovering, Waiting: self._waiting}[type(state)]
        return handler(state)

    def _starting(self, state: Starting) -> State:
        event = state.event
        t0 = time.time()
        fresh = self.scaling.start_size(self.capacity.observe(force=True))
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
                fits = self.scaling.start_size(self.capacity.observe(force=True))
                size = None if fits is None else min(fits, size - 1)
                if size is not None and size < self.scaling.min_workers:
                    size = None
        if size is None:
            return Waiting(event, since_s=time.time())
        if size < kept:
            self._release(self._surplus(kept - size))
        self.capacity.forget_released()
        event.phases[Phase.PLACEMENT] = time.time() - t0
        self.inbox.reset()
        try:
            t1 = time.time()
            started = self.group.start_placed()
            event.phases[Phase.ACTORS] = time.time() - t1
            self.group.launch()
            self.watchdog.start(time.time())
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
        hang = self.watchdog.check(time.time())
        if hang is not None:
            return self._on_hang(hang)
        obs = self.capacity.observation(last_resize_s=self._resumed_s)
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
                from_workers=self.group.size, at_step=self.record.last_step,
                phases={Phase.DETECT: time.time() - self.capacity.changed_s}))
        time.sleep(POLL_INTERVAL_S)
        return state

    def _resizing(self, state: Resizing) -> State:
        event = state.event
        t0 = time.time()
        deadline = self.capacity.drain_deadline()
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
        event.at_step = self.record.last_step
        t1 = time.time()
        self._release([w for w in self.group.workers if self.capacity.draining(w.node_id)])
        event.phases[Phase.TEARDOWN] = time.time() - t1
        if self.record.last_step >= self.config.max_steps:
            return Finished()
        return Starting(event, target=state.decision.num_workers or None)

    def _recovering(self, state: Recovering) -> State:
        event = state.event
        t0 = time.time()
        failure, previous = state.failure, self._last_failure
        if failure.kind in _PEER_LOST:  # the others' collectives fail: keep their processes
            self.capacity.note_released(self.group.keep_survivors(
                self.config.failure.survivor_timeout_s))
        else:  # a training error may have left a process unusable (a CUDA error): replace all
            self._release(list(self.group.workers))
        event.phases[Phase.TEARDOWN] = time.time() - t0
        decision = self.failure_policy.decide(failure, self.failures, previous)
        self._last_failure = failure
        if self.failure_policy.counts(failure):
            self.failures += 1
        retrying = decision is not FailureDecision.RAISE
        self.record.failure(FailureNotice(
            failure.kind.value, failure.message, self.record.last_step, retrying))
        self.telemetry.failure(failure.kind.value, self.record.last_step, failure.message)
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
        capacity = self.capacity.observe(force=True)
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
        self.capacity.note_released(workers)

    def _surplus(self, n: int) -> list[Worker]:
        """The ``n`` workers a shrink removes: those on draining nodes first, then the last
        ranks (rank 0's process stays where it is)."""
        order = sorted(enumerate(self.group.workers),
                       key=lambda rw: (not self.capacity.draining(rw[1].node_id), -rw[0]))
        return [w for _, w in order[:n]]

    def _on_hang(self, hang: Hang) -> State:
        """The group made no progress for longer than the watchdog allows: SIGKILL the
        processes of the ranks that no longer answer (every rank's when all answer: a
        deadlock in the training code), never waiting on their collectives. The others'
        collectives then fail and they are kept as after a worker death."""
        self.watchdog.stop()
        stuck = self.group.unresponsive(timeout_s=_HANG_PING_S)
        everyone = not stuck
        ranks = list(range(self.group.size)) if everyone else stuck
        self.group.sigkill(ranks)
        what = ("the first step" if hang.first_step else
                f"a step after step {self.record.last_step}")
        who = (f"every rank answered, so all were killed: rank(s) {ranks}" if everyone else
               f"rank(s) {ranks} stopped responding and were killed (SIGKILL)")
        failure = Failure(FailureKind.HANG,
                          f"the group hung: no progress for {hang.seconds:.1f} s waiting for "
                          f"{what} ({hang.setting}={hang.limit_s:g}); {who}")
        return self._on_failure(failure, detect_s=hang.seconds)

    def _on_failure(self, failure: Failure, detect_s: float | None = None) -> State:
        if failure.kind in (FailureKind.WORKER_DIED, FailureKind.NODE_DIED) and \
                self.capacity.draining_workers():
            failure = dataclasses.replace(failure, kind=FailureKind.PREEMPTED)
        return Recovering(failure, ScalingEvent(
            "failure", failure.message, from_workers=self.group.size,
            at_step=self.record.last_step,
            phases={Phase.DETECT: time.time() - self._last_healthy if detect_s is None
                    else detect_s}))

    def _ingest(self, poll: GroupPoll, state: Running) -> Running:
        """Fold the ranks' reports into the run record and the pending event's phases.
        Reports of earlier groups (still in flight when their group was killed) are dropped."""
        if poll.failure is None:
            self._last_healthy = time.time()
        event = state.event
        for rank, kind, payload in self.inbox.take(self.group.generation):
            self.watchdog.progress(time.time(), step=kind == "step")
            if kind == "event":
                self._on_rank_event(rank, payload, event)
            elif kind == "step":
                self._on_step(rank, payload)
            elif kind == "eval" and rank == 0:
                self.telemetry.eval(payload)
                self.record.eval(payload)
        if event is not None and Phase.FIRST_STEP in event.phases:
            event.resumed_step = self.record.restored_step
            self._resumed_s = time.time()
            self.timeline.complete(event)
            self.telemetry.scaling_event(event)
            self.record.event(event)
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
            self.record.restore(report.step)
        if isinstance(report, CheckpointCommitted):  # every committed save, event or not
            self.telemetry.checkpoint(report.step, report.seconds, report.bytes)
        if isinstance(report, CheckpointFailed):  # a background save: training goes on
            self.telemetry.failure("checkpoint_save", report.step, report.error)
            self.record.failure(FailureNotice("checkpoint_save", report.error, report.step, True))
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
        if rank == 0:
            self.telemetry.step(m)
        self.record.step(rank, m)

    def _tend_spares(self, obs: Observation) -> None:
        """Start the processes a coming scale-up needs while the group trains (at most one
        placement attempt per cluster poll); drop spares on draining nodes."""
        draining = [w for w in self.group.spares if self.capacity.draining(w.node_id)]
        if draining:
            self.group.release_spares(draining)
            self.capacity.note_released(draining)
        missing = self.scaling.wanted(obs) - self.group.size - len(self.group.spares)
        now = time.time()
        if missing > 0 and now - self._last_spare_try >= CLUSTER_POLL_INTERVAL_S:
            self._last_spare_try = now
            if self.group.add_spares(missing, min(1.0, self.config.scaling.placement_timeout_s)):
                self.capacity.forget_released()

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
