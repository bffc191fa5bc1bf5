"""The scaling timeline: one ``ScalingEvent`` per start, resize or recovery, with per-phase
seconds and steps lost, appended to ``<run_dir>/events.jsonl`` as it completes."""

from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import Any, Literal

from elastic_ckpt.train.events import Phase

EventKind = Literal["start", "scale_up", "drain", "failure"]
PHASES = tuple(p.value for p in Phase)
"""Phase names, in order: ``detect`` (event to decision; for crashes, last healthy poll to
detection), ``drain`` (stop request until every rank stopped, ``save`` included), ``save``
(the stop checkpoint), ``teardown`` (kill actors, free bundles), ``wait_capacity``,
``placement`` (placement group ready), ``actors`` (worker actors up), ``rendezvous`` (process
group), ``build`` (model construction + sharding), ``load`` (restore/re-shard on rank 0),
``first_step`` (the first step at the new size). ``total_s`` spans the event start to the
coordinator seeing that first step. ``detect`` is measured before the event starts (it ends at
``started_unix_s``) and ``save`` lies inside ``drain``; the other phases follow one another
from ``started_unix_s`` in this order (``elastic-ckpt timeline`` draws them so)."""


@dataclasses.dataclass
class ScalingEvent:
    kind: EventKind
    message: str
    from_workers: int
    started_unix_s: float = dataclasses.field(default_factory=time.time)
    to_workers: int | None = None
    at_step: int | None = None
    """Last step completed when the event began."""
    resumed_step: int | None = None
    """Step the new group restored from (its checkpoint)."""
    phases: dict[str, float] = dataclasses.field(default_factory=dict)
    """Seconds per ``Phase`` (keys are ``Phase`` members, equal to their names)."""
    total_s: float | None = None
    skipped_checkpoints: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """``{"step", "error"}`` of each corrupt checkpoint the restore skipped (and marked
    CORRUPT) to resume from an older one (``checkpoint.fallback_on_corrupt``)."""
    warnings: list[str] = dataclasses.field(default_factory=list)
    """What the restore noticed, e.g. a schedule (``max_steps``/``optim``) different from the
    run that wrote the checkpoint."""
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    """What rank 0 of the new group reported at build/restore: ``fsdp_units`` (the names of
    the modules sharded as their own unit, root ``""``) and, for a pretrained start,
    ``init_from``, ``init_bytes_read`` (by rank 0) and ``model_bytes``."""

    @property
    def steps_lost(self) -> int | None:
        """Steps that had completed but were not in the checkpoint resumed from."""
        if self.at_step is None or self.resumed_step is None:
            return None
        return max(0, self.at_step - self.resumed_step)

    def to_json(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["steps_lost"] = self.steps_lost
        out["phases"] = {k: round(v, 4) for k, v in self.phases.items()}
        return out


@dataclasses.dataclass(frozen=True)
class FailureNotice:
    """A failure as the coordinator saw it, sent to the driver at once (before any retry)."""

    kind: str
    """``FailureKind`` value (worker_died, node_died, preempted, training_error, fatal), or
    ``checkpoint_save``: a background save failed and training goes on."""
    message: str
    """What failed, with the rank's traceback for errors raised by training code."""
    at_step: int
    """Last step completed before the failure."""
    retrying: bool
    """True: the group restarts from the latest checkpoint; False: the run fails."""


class Timeline:
    """Collects events; writes each as one JSON line when it completes (if ``path`` is set)."""

    def __init__(self, path: str | None) -> None:
        self.path = path
        self.events: list[ScalingEvent] = []
        if path:
            os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)

    def complete(self, event: ScalingEvent) -> None:
        event.total_s = time.time() - event.started_unix_s
        self.events.append(event)
        if self.path:
            with open(self.path, "a") as f:
                f.write(json.dumps(event.to_json()) + "\n")
