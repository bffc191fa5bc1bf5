"""Coordinator states as data, and the transitions between them (one screen).

```
STARTING   -> RUNNING     group placed and launched
           -> WAITING     fewer than min_workers fit
           -> RECOVERING  a worker died while the group started
RUNNING    -> FINISHED    every rank reached max_steps
           -> RESIZING    ScalingPolicy: capacity grew / a node drains
           -> RECOVERING  a worker, node or the training code failed
RESIZING   -> STARTING    every rank stopped at a step boundary with a checkpoint (processes
                          kept, the draining nodes' released)
           -> RECOVERING  a failure while stopping
           -> FINISHED    the stop landed on max_steps
RECOVERING -> STARTING    FailurePolicy: RETRY (survivors kept if they left the group)
           -> FAILED      FailurePolicy: RAISE
WAITING    -> STARTING    min_workers fit again
           -> FAILED      scaling.capacity_timeout_s passed
```
"""

from __future__ import annotations

import dataclasses

from elastic_ckpt.coordinator.events import ScalingEvent
from elastic_ckpt.coordinator.policy import Failure, ResizeDecision


@dataclasses.dataclass(frozen=True)
class Starting:
    event: ScalingEvent
    target: int | None = None
    """Size a resize decided on (None: whatever fits)."""


@dataclasses.dataclass(frozen=True)
class Waiting:
    event: ScalingEvent
    since_s: float


@dataclasses.dataclass(frozen=True)
class Running:
    event: ScalingEvent | None
    """The event this run completes once its first step lands (None when done)."""
    started_s: float


@dataclasses.dataclass(frozen=True)
class Resizing:
    decision: ResizeDecision
    event: ScalingEvent


@dataclasses.dataclass(frozen=True)
class Recovering:
    failure: Failure
    event: ScalingEvent


@dataclasses.dataclass(frozen=True)
class Finished:
    pass


@dataclasses.dataclass(frozen=True)
class Failed:
    error: str


State = Starting | Waiting | Running | Resizing | Recovering | Finished | Failed

TRANSITIONS: dict[type, frozenset[type]] = {
    Starting: frozenset({Running, Waiting, Recovering}),
    Running: frozenset({Running, Finished, Resizing, Recovering}),
    Resizing: frozenset({Starting, Recovering, Finished}),
    Recovering: frozenset({Starting, Failed}),
    Waiting: frozenset({Waiting, Starting, Failed}),
}
TERMINAL = (Finished, Failed)


def check_transition(old: State, new: State) -> None:
    allowed = TRANSITIONS.get(type(old), frozenset())
    if type(new) not in allowed:
        raise RuntimeError(f"illegal coordinator transition {type(old).__name__} -> "
                           f"{type(new).__name__}")
