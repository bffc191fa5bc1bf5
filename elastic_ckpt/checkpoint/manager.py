"""``CheckpointManager``: save, load (re-sharding), list and retain checkpoints under one root.

```python
mgr = CheckpointManager(uri, keep_last=3)
info = mgr.save(step, {"app": AppState(model, optimizer), "extra": {"cursor": 7}})  # collective
info = mgr.load({"app": AppState(model, optimizer)})                               # collective
handle = mgr.async_save(step, state)  # collective; returns once staged to host memory
info = handle.result()                # once committed (re-raises a background failure)
```
Top-level entries of the state that are ``Stateful`` or hold tensors go through DCP with this
package's storage writer/reader; the other top-level entries must be JSON-able and are stored
in the manifest (``CheckpointInfo.extra``; dicts passed to ``load`` are also updated in place).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import math
import threading
import time
import uuid
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.stateful import Stateful

from elastic_ckpt.checkpoint.async_save import PersistJob, SaveHandle, StagingWriter, run_persist
from elastic_ckpt.checkpoint.catalog import Catalog, CheckpointInfo
from elastic_ckpt.checkpoint.collectives import (
    broadcast_from_rank0,
    first_failure,
    from_rank,
    group_rank,
    group_size,
    sum_over_ranks,
)
from elastic_ckpt.checkpoint.manifest import (
    COMMITTED_FILE,
    decode_json_value,
    encode_json_value,
    step_dirname,
)
from elastic_ckpt.checkpoint.memory_tier import Choice, MemoryTier, SnapshotStats
from elastic_ckpt.checkpoint.peer import HeldShards, PeerShardReader, holders
from elastic_ckpt.checkpoint.plan_cache import PlanCache, stage_with_cached_plan
from elastic_ckpt.checkpoint.planners import JsonLoadPlanner, JsonSavePlanner
from elastic_ckpt.checkpoint.reader import ReadStats, ShardReader
from elastic_ckpt.checkpoint.recycle import FilePool
from elastic_ckpt.checkpoint.retention import steps_to_delete, validate_retention
from elastic_ckpt.checkpoint.staging import HostStager
from elastic_ckpt.checkpoint.writer import PhaseCallback, ShardWriter
from elastic_ckpt.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointSaveError,
    ElasticCkptError,
    StorageError,
)

from elastic_ckpt.storage import Storage

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE_BYTES = 1 << 15
"""32 KiB checksum blocks: a re-shard reads at most one partial block beyond each end of each
range it needs (~32 KiB per tensor per boundary), so read amplification stays under 1.01 from
~0.2 GB of state up, while the checksum list stays ~0.02% of the data (base64 crc32c)."""


class CheckpointManager:
    """Owns one checkpoint root. ``save`` and ``load`` are collective over ``process_group``
    (every rank calls them with the same arguments); ``latest``/``list`` are local reads.

    A failed ``save`` never touches the previous committed checkpoint; a failed ``load`` raises
    a typed error on every rank (``CheckpointNotFoundError``, ``CheckpointNotCommittedError``,
    ``CheckpointCorruptError``, ``CheckpointMismatchError``).
    """

    def __init__(
        self,
        uri: str,
        keep_last: int | None = 3,
        keep_every: int | None = None,
        *,
        block_size_bytes: int = DEFAULT_BLOCK_SIZE_BYTES,
        read_threads: int | None = None,
        process_group: dist.ProcessGroup | None = None,
        on_phase: PhaseCallback | None = None,
        persist_timeout_s: float = 1800.0,
        recycle_files: bool = True,
    ) -> None:
        validate_retention(keep_last, keep_every)
        self.root = Storage(uri)
        self.uri = self.root.uri
        self.catalog = Catalog(self.root)
        self.keep_last = keep_last
        self.keep_every = keep_every
        self.block_size_bytes = block_size_bytes
        self.read_threads = read_threads
        """Threads each ``load`` reads with on this rank (None: ``default_read_threads()`` at
        the time of the load)."""
        self.recycle_files = recycle_files
        """Let retention hand the rank files of checkpoints it removes to the next save, which
        overwrites them in place (local filesystems; see ``elastic_ckpt.checkpoint.recycle``).
        """
        self._pool = FilePool(self.root)
        self.process_group = process_group
        self.on_phase = on_phase
        self.last_read_stats = ReadStats()
        self.last_skipped: list[tuple[int, str]] = []
        """``(step, error)`` of each corrupt checkpoint the last ``load(fallback=True)``
        skipped (and marked CORRUPT), newest first."""
        self.persist_timeout_s = persist_timeout_s
        """How long an async save's background thread waits for its peers' markers."""
        self.last_waited_s = 0.0
        """Seconds the last ``save``/``async_save`` waited for the previous async save."""
        self._stager = HostStager()
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._in_flight: SaveHandle | None = None
        self._plans: PlanCache | None = None
        self._totals: tuple[Any, int, int] = (None, 0, 0)  # _info's, per metadata
        self._async_saves = 0
        self._abandon = threading.Event()  # set by close(abandon=True)
        self.held: HeldShards | None = None
        """What the last ``save(..., hold=True)`` wrote from this rank (see ``load``)."""
        self.last_from_memory = False
        """Whether the last ``load`` restored a peer-memory snapshot (``memory=``)."""

    @property
    def staging_bytes(self) -> int:
        """Host memory this rank holds for async-save staging (one copy of its state)."""
        return self._stager.nbytes

    @property
    def staging_buffers(self) -> int:
        return len(self._stager.buffers)

    def wait(self, timeout: float | None = None) -> SaveHandle | None:
        """Wait for the async save in flight, if any (its failure stays on its handle)."""
        handle = self._in_flight
        if handle is not None:
            concurrent.futures.wait([handle._future], timeout=timeout)
            if handle.done():
                self._in_flight = None
        return handle

    def close(self, abandon: bool = False, timeout: float | None = None) -> None:
        """Finish with this manager: wait for the async save in flight, then stop its
        background thread. ``abandon=True`` (the group this manager saved with is gone, so
        peers may never write their markers): the save in flight stops waiting for them and
        fails with ``CheckpointSaveError``, unless what it waits for is already there (rank 0
        still commits a save whose every rank is durable). Its data writes finish first, so
        once this returns nothing of this manager touches storage any more (unless
        ``timeout`` passed first). Local; the manager can still load and save afterwards."""
        handle = self._in_flight
        if handle is not None and abandon:
            self._abandon.set()
        self.wait(timeout)
        self._abandon = threading.Event()  # for the saves after this one
        if self._executor is not None and (handle is None or handle.done()):
            self._executor.shutdown(wait=True)
            self._executor = None

    def wait_staged(self) -> float:
        """Wait for the deferred copies of the async save in flight (see ``async_save``'s
        ``overlap_staging``); returns the seconds blocked."""
        handle = self._in_flight
        return 0.0 if handle is None else handle.wait_staged()

    # -- queries (local) ---------------------------------------------------------------------
    def list(self) -> list[CheckpointInfo]:
        """Committed checkpoints whose manifest reads, oldest first. A committed checkpoint
        whose manifest cannot be read or validated is left out, with a warning (`elastic-ckpt
        ls` shows it as unreadable)."""
        committed, _ = self.catalog.scan()
        return [info for info in map(self._info_or_none, committed) if info is not None]

    def latest(self) -> CheckpointInfo | None:
        """The newest committed checkpoint whose manifest reads, or None."""
        committed, _ = self.catalog.scan()
        for step in reversed(committed):
            info = self._info_or_none(step)
            if info is not None:
                return info
        return None

    def _info_or_none(self, step: int) -> CheckpointInfo | None:
        try:
            return self.catalog.info(step)
        except CheckpointError as exc:
            log.warning("skipping committed checkpoint step %d under %s: %s", step, self.uri,
                        exc)
            return None

    # -- collectives -------------------------------------------------------------------------
    def save(self, step: int, state: dict[str, Any], *, hold: bool = False) -> CheckpointInfo:
        """Write ``state`` as checkpoint ``step`` and commit it; then apply retention.

        Collective. Returns once the checkpoint is committed (manifest and marker durable).
        Raises ``CheckpointSaveError`` if ``step`` is already committed. Waits first for an
        async save in flight (``last_waited_s``). ``hold=True``: keep references to the
        tensors this rank wrote in ``self.held`` (``peer.HeldShards``), so that a new group
        this process joins can load the checkpoint from memory (``load(..., held=)``); only
        valid while nothing changes those tensors (the caller stops training).
        """
        self._check_step(step)
        self.last_waited_s = self._wait_previous()
        dcp_state, extra = _split_state(state)
        name = step_dirname(step)
        failure = None
        if self._rank() == 0:
            try:
                self._prepare_directory(step, name)
            except Exception as exc:  # every rank must raise, or the others block in dcp.save
                failure = exc
        failure = self._broadcast(failure)
        if failure is not None:
            raise failure
        writer = ShardWriter(self.root.child(name), step=step, extra=extra,
                             block_size_bytes=self.block_size_bytes, on_phase=self.on_phase,
                             process_group=self.process_group, pool=self._lender(),
                             checksum_during_fsync=True,  # the caller waits: nothing changes
                             hold=hold)
        self.held = None
        metadata = self._run_dcp(lambda: dcp.save(dcp_state, storage_writer=writer,
                                       planner=JsonSavePlanner(),
                                       process_group=self.process_group))
        if hold:
            self.held = HeldShards(writer.directory.uri, writer.rank, writer.held or {})
        if self._rank() == 0:
            self._apply_retention(in_progress=frozenset())
        # dcp.save hands every rank the global metadata, so no extra collective is needed.
        return self._info(step, name, metadata, extra)

    def async_save(self, step: int, state: dict[str, Any], *,
                   overlap_staging: bool = False) -> SaveHandle:
        """Stage ``state`` as checkpoint ``step`` into host memory and return; writing,
        fsync, manifest, ``COMMITTED`` and retention run on this manager's background thread.

        Collective, like ``save``: DCP's planning runs here, on the training process group,
        and every tensor this rank writes is copied into reused host buffers (pinned for CUDA
        sources), so the caller may change its state as soon as this returns. At most one
        save is in flight: this first waits for the previous one (``SaveHandle.waited_s``).
        The background thread coordinates the commit through storage markers, never a process
        group (see ``elastic_ckpt.checkpoint.async_save``).

        ``overlap_staging=True`` defers the copies of DTensor entries (FSDP2 parameters and
        their optimizer state) to the background thread, so they overlap the caller's next
        forward/backward: the caller must call ``handle.wait_staged()`` before it changes them
        (before ``optimizer.step()``). Plain tensors (buffers, step counters) are still copied
        before this returns.

        Errors found before returning (step already committed, a leaf that is not JSON-able)
        raise here, on every rank.
        """
        self._check_step(step)
        waited = self.last_waited_s = self._wait_previous()
        start = time.perf_counter()
        dcp_state, extra = _split_state(state)
        name = step_dirname(step)
        self._async_saves += 1
        failure = None
        if self._rank() == 0:
            try:
                self._prepare_directory(step, name)
            except Exception as exc:  # every rank must raise, or the others block in dcp.save
                failure = exc

        def staging_writer() -> StagingWriter:
            return StagingWriter(self.root.child(name), self._stager, step=step, extra=extra,
                                 block_size_bytes=self.block_size_bytes,
                                 on_phase=self.on_phase, process_group=self.process_group,
                                 pool=self._lender(), defer_dtensors=overlap_staging)

        writer, metadata = staging_writer(), None
        if self._plans is not None:  # one all-reduce when no rank's plan changed
            token = f"{self._plans.token}-{self._async_saves}"
            metadata = self._stage_cached(dcp_state, writer, failure)
            failure = None  # raised on every rank by _stage_cached, had there been one
        if metadata is None:  # DCP's collective planning, remembered for the next save
            failure, token = self._broadcast((failure, uuid.uuid4().hex))
            if failure is not None:
                raise failure
            writer, planner = staging_writer(), JsonSavePlanner()
            metadata = self._run_dcp(lambda: dcp.save(dcp_state, storage_writer=writer,
                                                      planner=planner,
                                                      process_group=self.process_group))
            self._plans = PlanCache.of(writer, planner, metadata, self._rank(),
                                       self._world_size(), token)
        writer.metadata = metadata
        job = PersistJob(writer=writer, rank=self._rank(), world_size=self._world_size(),
                         token=token, info=self._info(step, name, metadata, extra),
                         timeout_s=self.persist_timeout_s, abandoned=self._abandon,
                         after_commit=lambda: self._apply_retention(in_progress=frozenset()))
        handle = SaveHandle(step, concurrent.futures.Future(),
                            staged_s=time.perf_counter() - start, waited_s=waited,
                            staged_bytes=writer.staged_bytes, fence=writer.fence)
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=1, thread_name_prefix="elastic-ckpt-persist")
        self._in_flight = handle
        self._executor.submit(run_persist, job, handle)
        return handle

    def _stage_cached(self, dcp_state: dict[str, Any], writer: StagingWriter,
                      failure: BaseException | None) -> Any:
        """Stage with the last async save's plans when no rank's plan changed: one small
        all-reduce instead of DCP's gathers and scatters of plans and metadata (and the
        broadcast of a token). Raises, on every rank, any rank's ``failure`` or staging error.
        None (cache dropped): plan with DCP."""
        metadata = stage_with_cached_plan(
            dcp_state, writer, self._plans, JsonSavePlanner(), rank=self._rank(),
            world_size=self._world_size(), failure=failure, count=self._sum,
            first_failure=self._first_failure)
        if metadata is None:
            self._plans = None
        return metadata

    def _check_step(self, step: int) -> None:
        if not isinstance(step, int) or step < 0:
            raise CheckpointSaveError(f"step must be a non-negative int, got {step!r}")

    def _wait_previous(self) -> float:
        start = time.perf_counter()
        self.wait()
        return time.perf_counter() - start

    def _info(self, step: int, name: str, metadata: Any, extra: dict) -> CheckpointInfo:
        if self._totals[0] is not metadata:  # the same object while the plans are cached
            tensors = [md for md in metadata.state_dict_metadata.values() if hasattr(md, "chunks")]
            self._totals = (metadata, sum(math.prod(c.sizes) * md.properties.dtype.itemsize
                                          for md in tensors for c in md.chunks), len(tensors))
        _, total, num_tensors = self._totals
        return CheckpointInfo(step=step, uri=self.root.uri_of(name),
                              world_size=self._world_size(), total_bytes=total,
                              created_unix_s=time.time(), num_tensors=num_tensors,
                              extra=decode_json_value(extra))

    def snapshot(self, step: int, state: dict[str, Any], tier: MemoryTier) -> SnapshotStats:
        """Collective: snapshot ``state`` as step ``step`` into the peer-memory ``tier``
        (host memory, replicated on another node; ``elastic_ckpt.checkpoint.memory_tier``).
        Nothing is written to storage; ``load(..., memory=tier)`` restores it."""
        self._check_step(step)
        self.wait_staged()  # (an async save's deferred copies read the same tensors)
        dcp_state, extra = _split_state(state)
        return tier.take(step, dcp_state, extra, self.process_group)

    def load(self, state: dict[str, Any], step: int | None = None, *,
             fallback: bool = False, held: HeldShards | None = None,
             memory: MemoryTier | None = None) -> CheckpointInfo:
        """Load checkpoint ``step`` (default: the latest committed) into ``state`` in place,
        re-sharding to the current world size. Collective.

        A missing, uncommitted or corrupt checkpoint raises a typed error on every rank. With
        ``fallback=True`` (and no ``step``), a corrupt latest checkpoint is instead marked
        ``CORRUPT`` (kept on storage, no longer listed) and the next older committed one is
        loaded, and so on; ``last_skipped`` then names what was skipped and why. State a
        failed attempt half-wrote is overwritten in full by the checkpoint that loads; if none
        loads, the last error is raised. Waits first for the deferred staging copies of an
        async save in flight (they read the tensors this overwrites).

        ``held``: the chunks this process wrote to a checkpoint and still holds (an earlier
        ``save(..., hold=True)``, possibly in another group). When the checkpoint loaded is
        that one, every chunk whose writer is a member of this group comes from the member's
        memory over the process group, the rest from storage (``last_read_stats``).

        ``memory`` (every rank passes its ``MemoryTier``, or none does): when the members hold
        between them every writer's piece of a snapshot newer than the latest committed
        checkpoint, that snapshot is loaded from their memory instead, re-sharded to this
        group (``CheckpointInfo.uri`` is then ``memory:<group>/step-N``); ``last_from_memory``
        says which it was.
        """
        self.wait_staged()
        self.last_skipped = []
        self.last_from_memory = False
        if step is not None:
            return self._load_step(state, step, held)
        committed, _ = self.catalog.scan() if self._rank() == 0 else (None, None)
        committed = self._broadcast(committed)
        choice = memory.agree(self.process_group) if memory is not None else None
        if choice is not None and (not committed or choice.step > committed[-1]):
            return self._load_memory(state, memory, choice)
        if not committed:
            raise CheckpointNotFoundError(
                f"no committed checkpoint under {self.uri}", path=self.uri)
        if not fallback:
            return self._load_step(state, committed[-1], held)
        for candidate in reversed(committed):
            try:
                return self._load_step(state, candidate, held)
            except CheckpointCorruptError as exc:
                error = exc
                log.warning("checkpoint step %d under %s is corrupt; marking it CORRUPT and "
                            "trying the next older one: %s", candidate, self.uri, exc)
                self.last_skipped.append((candidate, str(exc)))
                self._quarantine(candidate, str(exc))
        raise CheckpointCorruptError(
            f"every committed checkpoint under {self.uri} is corrupt (steps "
            f"{', '.join(str(s) for s, _ in self.last_skipped)}; all now marked CORRUPT). The "
            f"newest error: {self.last_skipped[0][1]}", path=self.uri) from error

    def _load_step(self, state: dict[str, Any], step: int,
                   held: HeldShards | None = None) -> CheckpointInfo:
        opened: tuple[Storage, Any] | None = None
        failure: BaseException | None = None
        try:
            opened = self.catalog.open(step)
        except Exception as exc:  # agreed on below, whatever it is
            failure = exc
        # Every rank reads the manifest itself; all must agree before entering dcp.load, or
        # a rank that failed would leave the others blocked in its collectives.
        failure = self._first_failure(failure)
        if failure is not None:
            raise failure
        directory, manifest = opened
        dcp_state, _ = _split_state(state)
        threads = self.read_threads or default_read_threads()
        members = holders(held, directory.uri, self.process_group)  # the same on every rank
        reader = (PeerShardReader(directory, manifest, num_threads=threads, held=held,
                                  holders=members, process_group=self.process_group)
                  if members else ShardReader(directory, manifest, num_threads=threads))
        self._run_dcp(lambda: dcp.load(dcp_state, storage_reader=reader,
                                       planner=JsonLoadPlanner(),
                                       process_group=self.process_group))
        info = CheckpointInfo.from_manifest(directory.uri, manifest)
        _update_extras(state, info)
        self.last_read_stats = reader.stats
        return info

    def _load_memory(self, state: dict[str, Any], tier: MemoryTier,
                     choice: Choice) -> CheckpointInfo:
        reader, record = tier.reader(choice, self.process_group)
        dcp_state, _ = _split_state(state)
        self._run_dcp(lambda: dcp.load(dcp_state, storage_reader=reader,
                                       planner=JsonLoadPlanner(),
                                       process_group=self.process_group))
        info = dataclasses.replace(
            self._info(record.step, step_dirname(record.step), record.metadata, record.extra),
            uri=f"memory:{record.group}/{step_dirname(record.step)}",
            world_size=record.world_size)
        _update_extras(state, info)
        self.last_read_stats, self.last_from_memory = reader.stats, True
        return info

    def _quarantine(self, step: int, reason: str) -> None:
        """Collective: rank 0 writes the CORRUPT marker; everyone waits until it is durable."""
        if self._rank() == 0:
            try:
                self.catalog.quarantine(step, reason)
            except StorageError as exc:  # the fallback still works; only the marker is lost
                log.warning("could not mark checkpoint step %d corrupt: %s", step, exc)
        if dist.is_initialized() and self._world_size() > 1:
            dist.barrier(group=self.process_group)

    # -- internals ---------------------------------------------------------------------------
    def _prepare_directory(self, step: int, name: str) -> None:
        committed, uncommitted, quarantined = self.catalog.scan_all()
        if step in committed:
            raise CheckpointSaveError(
                f"checkpoint step {step} is already committed at {self.root.uri_of(name)}; "
                "checkpoints are immutable. Save under a new step or delete it first.",
                step=step)
        if step in uncommitted:  # debris of a crashed save of the same step
            self.root.remove_tree(name)
        elif step in quarantined:  # a run that fell back past it saves this step again
            log.warning("replacing %s, marked corrupt by an earlier load, with a new save",
                        self.root.uri_of(name))
            self.root.remove_tree(name)
        self.root.makedirs(name)

    def _apply_retention(self, in_progress: frozenset[int]) -> None:
        """Best effort: the save already committed, and only rank 0 runs this, so a failed
        delete is logged (and retried after the next save), never raised."""
        try:
            committed, uncommitted = self.catalog.scan()
            for step in steps_to_delete(committed, uncommitted, self.keep_last,
                                        self.keep_every, in_progress):
                # Un-commit first: a delete cut short leaves debris, never a committed
                # checkpoint with missing files; only then may its files be recycled.
                self.root.remove(f"{step_dirname(step)}/{COMMITTED_FILE}")
                if self.recycle_files:
                    self._pool.donate(step_dirname(step), step)
                self.root.remove_tree(step_dirname(step))
            if not self.recycle_files:
                self._pool.clear()  # files an earlier run with recycling left
        except StorageError as exc:
            log.warning("retention under %s failed (will retry after the next save): %s",
                        self.uri, exc)

    def _lender(self) -> FilePool | None:
        return self._pool if self.recycle_files and self._pool.enabled else None

    def _run_dcp(self, fn: Callable[[], Any]) -> Any:
        try:
            return fn()
        except CheckpointException as exc:
            raise _unwrap(exc) from None

    # The small collectives over this manager's process group (``collectives``).
    def _rank(self) -> int:
        return group_rank(self.process_group)

    def _world_size(self) -> int:
        return group_size(self.process_group)

    def _sum(self, values: list[int]) -> list[int]:
        return sum_over_ranks(values, self.process_group)

    def _first_failure(self, failure: BaseException | None) -> BaseException | None:
        return first_failure(failure, self.process_group)

    def _broadcast(self, value: Any) -> Any:
        return broadcast_from_rank0(value, self.process_group)


def default_read_threads() -> int:
    """Reader threads per rank: the intra-op threads the launcher gave this rank
    (``torch.get_num_threads()``: its share of the node's cores), at most 8. More reader
    threads than cores cost more in switching than they overlap: with 2 ranks on 2 cores, 4
    threads each made re-shard loads 1.1-1.7x slower than one."""
    return max(1, min(8, torch.get_num_threads()))


def latest_or_reason(uri: str) -> tuple[CheckpointInfo | None, str]:
    """The latest committed checkpoint under ``uri`` and how an error message names it: its
    URI, ``none in URI``, or ``unknown (URI cannot be read: ...)``. Never raises: a failure
    report must not fail itself."""
    try:
        latest = CheckpointManager(uri).latest()
    except Exception as exc:  # noqa: BLE001 - storage errors while reporting a failure
        return None, f"unknown ({uri} cannot be read: {type(exc).__name__}: {exc})"
    return latest, latest.uri if latest is not None else f"none in {uri}"


def _split_state(state: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``(entries for DCP, JSON-encoded extras)``."""
    if not isinstance(state, dict):
        raise TypeError(f"checkpoint state must be a dict of name -> value, got {type(state)}")
    dcp_state, extra = {}, {}
    for key, value in state.items():
        if isinstance(value, (Stateful, torch.Tensor)) or _holds_tensor(value):
            dcp_state[key] = value
        else:
            extra[key] = encode_json_value(value, key)
    return dcp_state, extra


def _update_extras(state: dict[str, Any], info: CheckpointInfo) -> None:
    """The dicts among ``state``'s JSON entries take the loaded checkpoint's values."""
    for key, value in info.extra.items():
        if isinstance(state.get(key), dict) and isinstance(value, dict):
            state[key].clear()
            state[key].update(value)


def _holds_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, dict):
        return any(_holds_tensor(v) for v in value.values())
    if isinstance(value, (list, tuple)):
        return any(_holds_tensor(v) for v in value)
    return False


def _unwrap(exc: CheckpointException) -> BaseException:
    """DCP wraps per-rank failures; surface ours with their type, naming the failing rank."""
    failures = exc.failures
    for rank in sorted(failures):
        inner = failures[rank][0] if isinstance(failures[rank], tuple) else failures[rank]
        if isinstance(inner, ElasticCkptError):
            return from_rank(inner, rank)
    return CheckpointError(f"checkpoint operation failed: {exc}")
