"""Pure policies: observations in, decisions out. They never call Ray or read the clock; the
coordinator passes ``now_s`` in and carries the decisions out. Tested as tables."""

from __future__ import annotations

import dataclasses
import enum
from typing import Literal, Protocol


@dataclasses.dataclass(frozen=True)
class Observation:
    """What the coordinator knows at one poll."""

    now_s: float
    num_workers: int
    """Size of the running group (0 when none runs)."""
    capacity: int
    """Workers that fit on alive, non-draining nodes, counting the group's own resources."""
    capacity_changed_s: float
    """When ``capacity`` last changed (bursts of node events settle before a resize)."""
    draining_workers: int = 0
    """Workers of the running group on nodes that are draining (preemption notice)."""
    last_resize_s: float | None = None
    """When the group last started (None: never)."""


@dataclasses.dataclass(frozen=True)
class ResizeDecision:
    num_workers: int
    reason: Literal["scale_up", "drain"]


@dataclasses.dataclass(frozen=True)
class NoopDecision:
    pass


ScalingDecision = ResizeDecision | NoopDecision


@dataclasses.dataclass(frozen=True)
class ScalingPolicy:
    """Graceful resizes of a running group.

    - A drain notice on a node that hosts workers resizes at once (the deadline is what matters)
      to what fits on the other nodes, and never waits for the cooldown.
    - More capacity scales up to ``min(capacity, max_workers)`` once capacity has been stable
      for ``settle_s`` (so nodes joining in a burst cause one resize) and ``cooldown_s`` has
      passed since the group started; ``wanted`` says how many processes to start ahead of
      it (hot spares).
    - Less capacity than the running group without a drain is left alone: the group holds its
      own resources, and a crash is the failure policy's business.
    """

    min_workers: int
    max_workers: int
    cooldown_s: float = 5.0
    settle_s: float = 1.0

    def target(self, capacity: int) -> int:
        return min(capacity, self.max_workers)

    def decide(self, obs: Observation) -> ScalingDecision:
        if obs.num_workers == 0:
            return NoopDecision()
        target = self.target(obs.capacity)
        if obs.draining_workers:
            return ResizeDecision(max(target, 0), "drain")
        if target <= obs.num_workers:
            return NoopDecision()
        if obs.now_s - obs.capacity_changed_s < self.settle_s:
            return NoopDecision()
        if obs.last_resize_s is not None and obs.now_s - obs.last_resize_s < self.cooldown_s:
            return NoopDecision()
        return ResizeDecision(target, "scale_up")

    def wanted(self, obs: Observation) -> int:
        """How many workers should have a process now: the group's, plus spares warming up
        for a coming scale-up. Spares start as soon as capacity grows, before ``settle_s``
        and the cooldown pass, so process start-up overlaps them and training; none while a
        node drains or no group runs."""
        if obs.num_workers == 0 or obs.draining_workers:
            return obs.num_workers
        return max(obs.num_workers, self.target(obs.capacity))

    def start_size(self, capacity: int) -> int | None:
        """Group size to start with, or None when fewer than ``min_workers`` fit."""
        target = self.target(capacity)
        return target if target >= self.min_workers else None


class FailureKind(enum.Enum):
    WORKER_DIED = "worker_died"
    """A worker process or actor died (OOM, segfault, killed)."""
    NODE_DIED = "node_died"
    """A node hosting workers disappeared without notice."""
    PREEMPTED = "preempted"
    """A node hosting workers was drained or preempted; not counted against max_failures."""
    HANG = "hang"
    """No rank reported progress for ``failure.step_timeout_s`` (the hang watchdog); the
    stuck ranks' processes were killed."""
    TRAINING_ERROR = "training_error"
    """The training code raised an exception."""
    FATAL = "fatal"
    """An error retrying cannot fix (bad config, checkpoint that does not fit the model)."""


@dataclasses.dataclass(frozen=True)
class Failure:
    kind: FailureKind
    message: str
    signature: tuple | None = None
    """For errors raised by training code: (exception type, message, step being trained,
    step restored from). Equal signatures on two attempts mean the same error at the same
    point after a restore from the same checkpoint: deterministic."""


class FailureDecision(enum.Enum):
    RETRY = "retry"
    RAISE = "raise"


@dataclasses.dataclass(frozen=True)
class FailurePolicy:
    """Retry crashes until ``max_failures`` of them (None: forever); preemptions never count;
    fatal errors never retry, nor does a training error that repeats itself exactly."""

    max_failures: int | None = 3

    def counts(self, failure: Failure) -> bool:
        return failure.kind is not FailureKind.PREEMPTED

    def is_repeat(self, failure: Failure, previous: Failure | None) -> bool:
        """The same training error as the previous failure, at the same step after a restore
        from the same checkpoint: retrying would only raise it again."""
        return (previous is not None and failure.kind is FailureKind.TRAINING_ERROR
                and failure.signature is not None and failure.signature == previous.signature)

    def decide(self, failure: Failure, failures_so_far: int,
               previous: Failure | None = None) -> FailureDecision:
        """``failures_so_far`` counts earlier counted failures, not this one; ``previous`` is
        the failure before this one (None: none since the run started)."""
        if failure.kind is FailureKind.FATAL or self.is_repeat(failure, previous):
            return FailureDecision.RAISE
        if not self.counts(failure) or self.max_failures is None:
            return FailureDecision.RETRY
        return (FailureDecision.RETRY if failures_so_far + 1 <= self.max_failures
                else FailureDecision.RAISE)


class ScalingPolicyProtocol(Protocol):
    """What the coordinator asks of a scaling policy (``ElasticTrainer(scaling_policy=...)``).
    Pure: the answers depend on the arguments only (the coordinator passes the clock in)."""

    min_workers: int
    """Fewest workers a group may have; below it the coordinator waits for capacity."""

    def decide(self, obs: Observation) -> ScalingDecision:
        """Resize the running group now (to ``num_workers``, for a reason), or not."""

    def start_size(self, capacity: int) -> int | None:
        """The size to start a group with when ``capacity`` workers fit (None: wait)."""

    def wanted(self, obs: Observation) -> int:
        """How many worker processes to have started now, spares for a coming scale-up
        included (return ``obs.num_workers`` for none)."""


class FailurePolicyProtocol(Protocol):
    """What the coordinator asks of a failure policy (``ElasticTrainer(failure_policy=...)``).
    Pure, like ``FailurePolicy``."""

    def decide(self, failure: Failure, failures_so_far: int,
               previous: Failure | None = None) -> FailureDecision:
        """Retry (restart from the latest checkpoint) or raise."""

    def counts(self, failure: Failure) -> bool:
        """Whether ``failure`` counts towards the failures so far."""

    def is_repeat(self, failure: Failure, previous: Failure | None) -> bool:
        """Whether ``failure`` repeats ``previous`` exactly (for the error message)."""
