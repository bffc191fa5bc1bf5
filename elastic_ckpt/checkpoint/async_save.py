"""Asynchronous saves: stage on the caller's thread, persist and commit in the background.

``CheckpointManager.async_save`` runs ``dcp.save`` on the calling thread with a
``StagingWriter``: DCP's planning (collective over the training process group) happens as for
``save``, but ``write_data`` only copies every tensor this rank writes into host buffers that
a ``HostStager`` allocates once per (fqn, chunk offset, shape, dtype) and reuses, and encodes
the non-tensor leaves as JSON (``staging``; with ``overlap_staging`` the copies of DTensor
entries are deferred to the background thread and fenced before the caller's next
``optimizer.step``). Later saves skip DCP's collective planning while no rank's plan changed
(``plan_cache``). Then ``persist`` runs on the manager's one background thread.

Coordination is storage-based, never a process group:

1. every rank writes ``rank-N.bin`` from its staged buffers (block checksums on the way) and
   fsyncs it, then writes ``rank-N.done`` atomically: its write results (byte ranges,
   checksums, JSON leaves), tagged with the save's token;
2. the coordinator waits for every rank's ``.done`` (or a ``rank-N.failed`` a rank left on a
   failure, or a timeout), builds the manifest from DCP's global metadata and those results,
   writes ``manifest.json`` and only then ``COMMITTED`` (ShardWriter's order, on_phase
   included), removes the ``.done`` markers and applies retention;
3. the other ranks wait for ``COMMITTED`` (or the coordinator's ``ABORTED``, or a timeout), so
   ``SaveHandle.result()`` means "committed" on every rank, as ``save`` does.

Why storage and not a second gloo group: it needs no extra collective at construction or new
ports, it cannot deadlock with or outlive the training group (the elastic coordinator tears
groups down on a resize; a gloo collective left running in a background thread would hang
or crash there), a dead peer shows up as a missing marker with a timeout naming the rank
rather than a gloo hang, and it works the same on object stores. ``COMMITTED`` still appears
only after every rank's data (fsynced before its ``.done``) and the manifest are durable; a
rank dying mid-persist leaves an uncommitted directory, which readers ignore and retention
removes once a newer checkpoint commits (or a re-save of the same step replaces).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import errno as errno_mod
import json
import threading
import time
from typing import Any, Callable

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import WriteResult
from torch.distributed.tensor import DTensor
from torch.futures import Future

from elastic_ckpt.checkpoint.catalog import CheckpointInfo
from elastic_ckpt.checkpoint.manifest import COMMITTED_FILE, MANIFEST_FILE, rank_filename
from elastic_ckpt.checkpoint.planners import placements_of
from elastic_ckpt.checkpoint.staging import HostStager, StagingFence
from elastic_ckpt.checkpoint.writer import (
    ShardWriter,
    _Object,
    _Written,
    json_objects,
    write_rank_file,
)
from elastic_ckpt.errors import CheckpointSaveError, ElasticCkptError
from elastic_ckpt.storage import Storage

ABORTED_FILE = "ABORTED"
"""Written (best effort) by the coordinator when an async save fails; never read as data."""

_POLL_S = (0.002, 0.1)  # first and longest sleep between marker checks


def done_name(rank: int) -> str:
    return f"rank-{rank:05d}.done"


def failed_name(rank: int) -> str:
    return f"rank-{rank:05d}.failed"


@dataclasses.dataclass
class _StagedItem:
    index: MetadataIndex
    buffer: torch.Tensor
    placements: tuple[str, ...] | None
    mesh_shape: tuple[int, ...] | None
    mesh_dim_names: tuple[str, ...] | None


class StagingWriter(ShardWriter):
    """A ``ShardWriter`` whose ``write_data`` stages instead of writing and whose ``finish``
    only keeps DCP's global metadata: ``persist`` does the writing and the commit later."""

    def __init__(self, directory: Storage, stager: HostStager, *, defer_dtensors: bool = False,
                 **kw: Any) -> None:
        super().__init__(directory, **kw)
        self.stager = stager
        self.defer_dtensors = defer_dtensors
        """Defer the copies of DTensor entries (FSDP2 parameters and their optimizer state,
        which only ``optimizer.step`` changes); plain tensors (buffers a forward may update,
        step counters) are always copied before ``write_data`` returns."""
        self.fence = StagingFence()
        self.staged: list[_StagedItem] = []
        self.objects: dict[MetadataIndex, str] = {}
        self.metadata: Metadata | None = None
        self.local_plan: SavePlan | None = None
        self.final_plan: SavePlan | None = None

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self.local_plan = plan
        return super().prepare_local_plan(plan)

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans  # always a fresh directory: never a rewrite aside

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        self.final_plan = plan
        self.objects = json_objects(plan, planner)
        flat_state = getattr(planner, "state_dict", None) or {}
        self.stager.begin()
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                continue
            tensor = planner.resolve_data(item)
            offsets = tuple(item.index.offset or ())
            value = flat_state.get(item.index.fqn)
            buf = self.stager.stage(item.index.fqn, offsets, tensor,
                                    defer=self.defer_dtensors and isinstance(value, DTensor))
            placements, mesh, axes = placements_of(value)
            self.staged.append(_StagedItem(item.index, buf, placements, mesh, axes))
        self.stager.finish_stage()
        self.fence = self.stager.fence()
        results = [WriteResult(index=s.index, size_in_bytes=s.buffer.nbytes, storage_data=None)
                   for s in self.staged]
        results += [WriteResult(index=i, size_in_bytes=len(t), storage_data=None)
                    for i, t in self.objects.items()]
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        self.metadata = metadata

    @property
    def staged_bytes(self) -> int:
        return sum(s.buffer.nbytes for s in self.staged)


@dataclasses.dataclass
class PersistJob:
    """Everything the background thread needs; built on the calling thread."""

    writer: StagingWriter
    rank: int
    world_size: int
    token: str
    info: CheckpointInfo
    timeout_s: float
    after_commit: Callable[[], None]
    abandoned: threading.Event = dataclasses.field(default_factory=threading.Event)
    """Set when the group this save belongs to is gone: stop waiting for peers' markers."""


class SaveHandle:
    """One ``async_save`` in flight. ``result()`` returns the ``CheckpointInfo`` once the
    checkpoint is committed (on every rank), or raises the background failure, typed."""

    def __init__(self, step: int, future: concurrent.futures.Future, *, staged_s: float,
                 waited_s: float, staged_bytes: int, fence: StagingFence | None = None) -> None:
        self.step = step
        self._future = future
        self.staged_s = staged_s
        """Seconds ``async_save`` blocked the caller planning and staging (``waited_s``
        excluded)."""
        self.fence = fence or StagingFence()
        self.waited_s = waited_s
        """Seconds this save waited for the previous one to finish before staging."""
        self.staged_bytes = staged_bytes
        self.persist_s: float | None = None
        """Seconds the background thread spent writing and committing (None until done)."""

    def wait_staged(self, timeout: float | None = None) -> float:
        """Block until every copy deferred by ``async_save(..., overlap_staging=True)`` is in
        host memory; after this the caller may change the saved tensors (call it before
        ``optimizer.step()``). Returns the seconds blocked; immediate without deferral."""
        return self.fence.wait(timeout)

    @property
    def stall_s(self) -> float:
        """Seconds this save blocked the caller: ``staged_s`` plus every ``wait_staged``."""
        return self.staged_s + self.fence.waited_s

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> CheckpointInfo:
        return self._future.result(timeout)

    def exception(self, timeout: float | None = None) -> BaseException | None:
        return self._future.exception(timeout)


def run_persist(job: PersistJob, handle: SaveHandle) -> None:
    """The background thread's task: ``persist``, then resolve the handle (``persist_s`` is
    set before ``result()`` returns)."""
    start = time.perf_counter()
    try:
        info = persist(job)
    except BaseException as exc:  # noqa: BLE001 - handed to the caller through the handle
        handle.persist_s = time.perf_counter() - start
        handle._future.set_exception(exc)
    else:
        handle.persist_s = time.perf_counter() - start
        handle._future.set_result(info)


def persist(job: PersistJob) -> CheckpointInfo:
    """Background thread: write this rank's file and markers; the coordinator commits."""
    directory = job.writer.directory
    try:
        _copy_deferred(job.writer)
        results = _write_rank(job)
    except BaseException as exc:
        error = _typed(exc, job, rank_filename(job.rank))
        _best_effort(directory, failed_name(job.rank),
                     json.dumps({"token": job.token, "error": str(error)}).encode())
        _reraise(error, exc)
    if job.rank == 0:
        try:
            _commit(job, results)
        except BaseException as exc:
            error = _typed(exc, job, MANIFEST_FILE)
            _best_effort(directory, ABORTED_FILE,
                         json.dumps({"token": job.token, "error": str(error)}).encode())
            _reraise(error, exc)
        job.after_commit()
    else:
        _wait_for_commit(job)
    return job.info


def _reraise(error: BaseException, cause: BaseException) -> None:
    if error is cause:
        raise error
    raise error from cause


def _copy_deferred(writer: StagingWriter) -> None:
    start = time.perf_counter()
    try:
        writer.stager.copy_deferred()
    finally:  # the caller never waits forever on its fence, whatever happened here
        writer.fence.release(time.perf_counter() - start)


def _write_rank(job: PersistJob) -> list[dict[str, Any]]:
    writer = job.writer
    chunks = ((item.index, item.buffer, (item.placements, item.mesh_shape, item.mesh_dim_names))
              for item in writer.staged)
    written = write_rank_file(writer.directory, job.rank, rank_filename(job.rank), chunks,
                              writer.block_size, pool=writer.pool,
                              checksum_during_fsync=True)  # private staging buffers
    out_results: list[dict[str, Any]] = [
        {"fqn": index.fqn, "offset": list(index.offset or ()), **dataclasses.asdict(w)}
        for index, w in written]
    for index, text in writer.objects.items():
        out_results.append({"fqn": index.fqn, "object": text})
    marker = {"token": job.token, "rank": job.rank, "results": out_results}
    writer.directory.write_atomic(done_name(job.rank), json.dumps(marker).encode())
    return out_results


def _commit(job: PersistJob, own: list[dict[str, Any]]) -> None:
    writer, directory = job.writer, job.writer.directory
    by_rank = {0: own}
    _poll(job, lambda: _collect_markers(job, by_rank), "every rank's data to be durable "
          f"(have ranks {sorted(by_rank)} of {job.world_size})")
    results: list[WriteResult] = []
    for rank in range(job.world_size):
        for r in by_rank[rank]:
            if "object" in r:
                results.append(WriteResult(index=MetadataIndex(r["fqn"]),
                                           size_in_bytes=len(r["object"]),
                                           storage_data=_Object(r["object"])))
                continue
            fields = {k: r[k] for k in ("file", "byte_offset", "byte_length", "checksums")}
            written = _Written(
                **fields, rank=rank, placements=_tuple(r["placements"]),
                mesh_shape=_tuple(r["mesh_shape"]), mesh_dim_names=_tuple(r["mesh_dim_names"]))
            results.append(WriteResult(index=MetadataIndex(r["fqn"], r["offset"]),
                                       size_in_bytes=r["byte_length"], storage_data=written))
    writer.on_phase("data_written")
    writer.write_commit(writer._build_manifest(writer.metadata, results,
                                               world_size=job.world_size))
    for rank in range(job.world_size):  # tidy; a leftover marker is harmless
        try:
            directory.remove(done_name(rank))
        except OSError:
            pass


def _collect_markers(job: PersistJob, by_rank: dict[int, list]) -> bool:
    directory = job.writer.directory
    for rank in range(job.world_size):
        if rank in by_rank:
            continue
        if directory.exists(failed_name(rank)):
            record = _read_marker(directory, failed_name(rank), job.token)
            if record is not None:
                raise CheckpointSaveError(
                    f"rank {rank} failed to persist its data: {record.get('error')}",
                    rank=rank, step=job.writer.step, path=directory.uri_of(failed_name(rank)))
        if directory.exists(done_name(rank)):
            record = _read_marker(directory, done_name(rank), job.token)
            if record is not None:
                by_rank[rank] = record["results"]
    return len(by_rank) == job.world_size


def _wait_for_commit(job: PersistJob) -> None:
    directory = job.writer.directory

    def committed() -> bool:
        if directory.exists(COMMITTED_FILE):
            return True
        if directory.exists(ABORTED_FILE):
            record = _read_marker(directory, ABORTED_FILE, job.token)
            if record is not None:
                raise CheckpointSaveError(
                    f"the coordinator aborted the save: {record.get('error')}",
                    step=job.writer.step, path=directory.uri_of(ABORTED_FILE))
        return False

    _poll(job, committed, f"{COMMITTED_FILE} from the coordinator rank")


def _poll(job: PersistJob, ready: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + job.timeout_s
    sleep = _POLL_S[0]
    while not ready():
        if job.abandoned.is_set():
            raise CheckpointSaveError(
                f"abandoned while waiting for {what} in {job.writer.directory.uri}: the "
                "group that made this save was re-formed. The save is not committed; the "
                "previous checkpoint stays the latest.",
                step=job.writer.step, path=job.writer.directory.uri)
        if time.monotonic() > deadline:
            raise CheckpointSaveError(
                f"timed out after {job.timeout_s:g} s waiting for {what} in "
                f"{job.writer.directory.uri}; a rank died or its storage hangs. The save is "
                "not committed; the previous checkpoint stays the latest.",
                step=job.writer.step, path=job.writer.directory.uri)
        time.sleep(sleep)
        sleep = min(sleep * 2, _POLL_S[1])


def _read_marker(directory: Storage, name: str, token: str) -> dict | None:
    try:
        record = json.loads(directory.read_bytes(name))
    except (OSError, ValueError):
        return None  # not there yet, or another save's torn debris
    return record if record.get("token") == token else None


def _best_effort(directory: Storage, name: str, data: bytes) -> None:
    try:
        directory.write_atomic(name, data)
    except OSError:
        pass  # the peers then time out instead of failing fast


def _typed(exc: BaseException, job: PersistJob, file: str) -> BaseException:
    """A background failure as a ``CheckpointSaveError`` naming the step, rank, file and
    (for an OS error) the errno name, e.g. ENOSPC."""
    if isinstance(exc, CheckpointSaveError) or not isinstance(exc, Exception):
        return exc
    os_error = next((e for e in _chain(exc) if isinstance(e, OSError) and e.errno), None)
    code = errno_mod.errorcode.get(os_error.errno) if os_error is not None else None
    uri = job.writer.directory.uri_of(file)
    detail = f" ({code})" if code else ""
    kind = "" if isinstance(exc, ElasticCkptError) else f"{type(exc).__name__}: "
    return CheckpointSaveError(
        f"async save of step {job.writer.step} failed on rank {job.rank} writing {uri}: "
        f"{kind}{exc}{detail}", step=job.writer.step, rank=job.rank, file=file, path=uri,
        errno=code)


def _chain(exc: BaseException):
    seen = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        yield exc
        exc = exc.__cause__ or exc.__context__


def _tuple(value: Any) -> tuple | None:
    return None if value is None else tuple(value)
