"""Asynchronous saves: stage on the caller's thread, persist and commit in the background.

``CheckpointManager.async_save`` runs ``dcp.save`` on the calling thread with a
``StagingWriter``: DCP's planning (collective over the training process group) happens as for
``save``, but ``write_data`` only copies every tensor this rank writes into host buffers that
a ``HostStager`` allocates once per (fqn, chunk offset, shape, dtype) and reuses, and encodes
the non-tensor leaves as JSON. Then ``persist`` runs on the manager's one background thread.

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
import time
from typing import Any, Callable

import torch
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.checkpoint.storage import WriteResult
from torch.futures import Future

from elastic_ckpt.checkpoint.catalog import CheckpointInfo
from elastic_ckpt.checkpoint.manifest import COMMITTED_FILE, MANIFEST_FILE, rank_filename
from elastic_ckpt.checkpoint.planners import placements_of
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


class HostStager:
    """Host buffers for staging, allocated once per key and reused by every later save.

    Pinned when the source is on CUDA (copies ``non_blocking`` on a side stream, synchronized
    before ``finish_stage`` returns); a plain ``copy_`` into the reused buffer on CPU. Buffers
    a save did not use are dropped at the end of it, so staging holds one copy of the rank's
    current state."""

    def __init__(self) -> None:
        self.buffers: dict[tuple, torch.Tensor] = {}
        self._used: set[tuple] = set()
        self._stream: Any = None
        self._pending_cuda = False

    @property
    def nbytes(self) -> int:
        return sum(b.numel() * b.element_size() for b in self.buffers.values())

    def begin(self) -> None:
        self._used = set()
        self._pending_cuda = False

    def stage(self, fqn: str, offsets: tuple[int, ...], src: torch.Tensor) -> torch.Tensor:
        src = src.detach()
        cuda = src.device.type == "cuda"
        key = (fqn, offsets, tuple(src.shape), src.dtype, cuda)
        buf = self.buffers.get(key)
        if buf is None:
            buf = torch.empty(src.shape, dtype=src.dtype, device="cpu", pin_memory=cuda)
            self.buffers[key] = buf
        self._used.add(key)
        if cuda:
            if self._stream is None:
                self._stream = torch.cuda.Stream(device=src.device)
            if not self._pending_cuda:
                self._stream.wait_stream(torch.cuda.current_stream(src.device))
                self._pending_cuda = True
            with torch.cuda.stream(self._stream):
                buf.copy_(src, non_blocking=True)
        elif src.device.type == "cpu":
            buf.copy_(src)
        else:
            buf.copy_(src.to("cpu"))
        return buf

    def finish_stage(self) -> None:
        if self._pending_cuda:
            self._stream.synchronize()
            self._pending_cuda = False
        for key in [k for k in self.buffers if k not in self._used]:
            del self.buffers[key]


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

    def __init__(self, directory: Storage, stager: HostStager, **kw: Any) -> None:
        super().__init__(directory, **kw)
        self.stager = stager
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
            buf = self.stager.stage(item.index.fqn, offsets, tensor)
            placements, mesh, axes = placements_of(flat_state.get(item.index.fqn))
            self.staged.append(_StagedItem(item.index, buf, placements, mesh, axes))
        self.stager.finish_stage()
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


@dataclasses.dataclass(frozen=True)
class PlanCache:
    """What DCP's collective planning decided at the last async save: this rank's local plan
    (as a signature), its final plan (after deduplication) and the global metadata. Valid for
    as long as every rank's local plan is unchanged: same keys, shapes, dtypes and shards."""

    signature: tuple
    final_plan: SavePlan
    metadata: Metadata

    @classmethod
    def of(cls, writer: StagingWriter, metadata: Metadata, rank: int,
           world_size: int) -> "PlanCache | None":
        if writer.local_plan is None or writer.final_plan is None:
            return None
        return cls(plan_signature(writer.local_plan, rank, world_size), writer.final_plan,
                   metadata)


def plan_signature(plan: SavePlan, rank: int, world_size: int) -> tuple:
    """Everything of a local save plan the global plan depends on."""
    items = []
    for item in plan.items:
        data = item.tensor_data
        items.append((item.index.fqn, tuple(item.index.offset or ()), item.type.value,
                      None if data is None else (tuple(data.size), str(data.properties.dtype),
                                                 tuple(data.chunk.offsets),
                                                 tuple(data.chunk.sizes))))
    mappings = plan.planner_data if isinstance(plan.planner_data, dict) else {}
    return (rank, world_size, tuple(items),
            tuple(sorted((k, tuple(v)) for k, v in mappings.items())))


def stage_with_cached_plan(state: dict[str, Any], writer: StagingWriter, cache: PlanCache,
                           planner: SavePlanner, *, rank: int, world_size: int,
                           agree: Callable[[bool], bool],
                           first_failure: Callable[[BaseException | None],
                                                   BaseException | None]) -> Metadata | None:
    """Stage ``state`` with the plans of the last save instead of DCP's collective planning.

    Collective, with the same two collectives on every rank whatever happens: ``agree`` (an
    AND over ranks) on "my local plan is unchanged", then ``first_failure`` (the lowest
    rank's exception, or None) after staging. Returns the global metadata, or None (nothing
    staged; plan with DCP, which also reproduces any error met before the agreement)."""
    try:
        flat = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state.items()}
        planner.set_up_planner(flat, writer.storage_meta(), rank == 0)
        writer.set_up_storage_writer(rank == 0, rank=rank, use_collectives=True)
        local = planner.create_local_plan()
        same = plan_signature(local, rank, world_size) == cache.signature
    except Exception:  # noqa: BLE001 - dcp.save meets it again and raises it on every rank
        same = False
    if not agree(same):
        return None
    failure = None
    try:
        writer.prepare_local_plan(local)
        writer.write_data(cache.final_plan, planner).wait()
    except Exception as exc:  # agreed on below, whatever it is
        failure = exc
    failure = first_failure(failure)
    if failure is not None:
        raise failure
    return cache.metadata


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


class SaveHandle:
    """One ``async_save`` in flight. ``result()`` returns the ``CheckpointInfo`` once the
    checkpoint is committed (on every rank), or raises the background failure, typed."""

    def __init__(self, step: int, future: concurrent.futures.Future, *, staged_s: float,
                 waited_s: float, staged_bytes: int) -> None:
        self.step = step
        self._future = future
        self.staged_s = staged_s
        """Seconds the caller was blocked planning and staging (``waited_s`` excluded)."""
        self.waited_s = waited_s
        """Seconds this save waited for the previous one to finish before staging."""
        self.staged_bytes = staged_bytes
        self.persist_s: float | None = None
        """Seconds the background thread spent writing and committing (None until done)."""

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


def _write_rank(job: PersistJob) -> list[dict[str, Any]]:
    writer = job.writer
    chunks = ((item.index, item.buffer, (item.placements, item.mesh_shape, item.mesh_dim_names))
              for item in writer.staged)
    written = write_rank_file(writer.directory, job.rank, rank_filename(job.rank), chunks,
                              writer.block_size, pool=writer.pool)
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
