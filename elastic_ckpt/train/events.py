"""What a rank reports besides its steps and evals (``RankHooks.on_event``), as typed records,
and ``Phase``, the names of the phases of a scaling event that the rank side, the coordinator,
the timeline and the benchmarks share."""

from __future__ import annotations

import dataclasses
import enum
from typing import Any


class Phase(str, enum.Enum):
    """The phases of a scaling event, in timeline order. A ``str``: ``phases[Phase.LOAD]`` and
    ``phases["load"]`` are the same entry, and JSON holds the plain name."""

    DETECT = "detect"
    """Event to decision (for crashes: last healthy poll to detection)."""
    DRAIN = "drain"
    """Stop request until every rank stopped (``save`` included)."""
    SAVE = "save"
    """The stop checkpoint."""
    TEARDOWN = "teardown"
    """Release the workers that leave (kill, free their bundles)."""
    WAIT_CAPACITY = "wait_capacity"
    """Fewer than ``min_workers`` fit: waiting for capacity."""
    PLACEMENT = "placement"
    """The new workers' bundles reserved."""
    ACTORS = "actors"
    """New worker processes started on the resize's path (0 when kept or spares)."""
    RENDEZVOUS = "rendezvous"
    """The process group formed."""
    BUILD = "build"
    """Model construction and sharding (rank 0)."""
    LOAD = "load"
    """Restore / re-shard (rank 0)."""
    FIRST_STEP = "first_step"
    """The first step at the new size."""

    def __str__(self) -> str:
        return self.value


@dataclasses.dataclass(frozen=True)
class Rendezvous:
    """The rank joined its process group."""

    seconds: float
    pid: int = 0
    groups_joined: int = 1
    """Groups this process has joined (> 1: it trained in an earlier group)."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """The model is built and its state restored (or initialized)."""

    seconds: float
    """The restore (load or pretrained init) after the build."""
    step: int
    """The step resumed from (0: fresh start)."""
    build_seconds: float
    from_world_size: int | None = None
    fsdp_units: list[str] = dataclasses.field(default_factory=list)
    skipped: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    """``{"step", "error"}`` of each corrupt checkpoint skipped."""
    warnings: list[str] = dataclasses.field(default_factory=list)
    from_peers_bytes: int = 0
    """Bytes of the checkpoint taken from the group's memory (re-shard from memory)."""
    from_storage_bytes: int = 0
    from_memory: bool = False
    """The state came from a peer-memory snapshot, not a committed checkpoint."""
    init_from: str | None = None
    init_bytes_read: int | None = None
    model_bytes: int | None = None
    init_seconds: float | None = None


@dataclasses.dataclass(frozen=True)
class FirstStep:
    """The first step of this group."""

    seconds: float
    since_start_s: float
    step: int


@dataclasses.dataclass(frozen=True)
class CheckpointStaged:
    """An async save returned: staged, persisting in the background."""

    step: int
    seconds: float
    waited_s: float
    staged_s: float
    staging_bytes: int


@dataclasses.dataclass(frozen=True)
class CheckpointCommitted:
    """A checkpoint is committed (``is_async``: an interval save that landed later)."""

    step: int
    seconds: float
    bytes: int
    is_async: bool
    waited_s: float = 0.0
    """A sync save: seconds it waited for the async save in flight first."""
    stall_s: float | None = None
    persist_s: float | None = None
    staging_bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class CheckpointFailed:
    """A background save failed; training goes on (up to ``max_failed_saves`` in a row)."""

    step: int
    error: str
    failed_in_a_row: int


RankEvent = (Rendezvous | Restored | FirstStep | CheckpointStaged | CheckpointCommitted
             | CheckpointFailed)
