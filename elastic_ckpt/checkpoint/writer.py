"""``ShardWriter``: a DCP ``StorageWriter`` for the elastic_ckpt format.

Each rank streams its chunks as raw bytes into one file, ``rank-NNNNN.bin``, computing block
checksums on the way, and fsyncs it. The coordinator rank then writes ``manifest.json``
(atomically, durably) and only then the ``COMMITTED`` marker. A crash anywhere before the
marker leaves debris that readers ignore. Non-tensor leaves go into the manifest as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from elastic_ckpt.checkpoint import checksum
from elastic_ckpt.checkpoint.manifest import (
    COMMITTED_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    ChunkEntry,
    Manifest,
    TensorEntry,
    dtype_name,
    dumps_value,
    parse_rank_filename,
    parse_step_dirname,
    rank_filename,
)
from elastic_ckpt.checkpoint.planners import check_json_leaves, placements_of
from elastic_ckpt.checkpoint.recycle import FilePool
from elastic_ckpt.errors import CheckpointSaveError, NotCheckpointableError
from elastic_ckpt.storage import Storage

PhaseCallback = Callable[[str], None]
"""Called on the coordinator rank with ``"data_written"`` (every rank's data durable),
``"manifest_written"`` and ``"committed"``. Used for timing and for fault injection."""


@dataclasses.dataclass(frozen=True)
class _Written:
    """Per-chunk storage data a rank reports back to the coordinator (JSON-able values)."""

    file: str
    byte_offset: int
    byte_length: int
    rank: int
    checksums: str
    placements: tuple[str, ...] | None = None
    mesh_shape: tuple[int, ...] | None = None
    mesh_dim_names: tuple[str, ...] | None = None


@dataclasses.dataclass(frozen=True)
class _Object:
    json_text: str


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """A zero-copy byte view of a CPU tensor (a copy only if it is not contiguous)."""
    flat = tensor.detach().reshape(-1)
    if not flat.is_contiguous():
        flat = flat.contiguous()
    return memoryview(flat.view(torch.uint8).numpy())


class ShardWriter(StorageWriter):
    """Writes one checkpoint directory: a drop-in for DCP's ``FileSystemWriter``.

    ```python
    dcp.save(state_dict, storage_writer=ShardWriter("s3://bucket/run/step-00000100"))
    ```
    ``path`` is a local path, a ``file://`` or any ``pyarrow.fs`` URI (or a ``Storage``); a
    ``checkpoint_id`` given to ``dcp.save`` replaces it (``reset``). The directory gets the
    format and commit protocol ``CheckpointManager`` uses, so one written here loads through
    ``CheckpointManager``/``ShardReader`` and vice versa. Works with DCP's default planners and
    with ``JsonSavePlanner``: non-tensor leaves are stored as JSON, never pickled, whichever
    planner asked; a leaf that is not JSON-able raises ``NotCheckpointableError`` naming it.

    ``overwrite=False`` refuses a directory that holds a committed checkpoint;
    ``overwrite=True`` (FileSystemWriter's default) rewrites it without ever exposing a
    committed checkpoint whose data does not match its manifest: every rank writes its file
    aside, and only once all are durable the coordinator un-commits the directory, swaps the
    files in (a rename; a copy on object stores), writes the manifest and commits. A rewrite
    that fails or dies before that (a refused leaf, a crash mid-write) leaves the old
    checkpoint committed and whole; one that dies during the swap leaves debris.

    FileSystemWriter's other options are accepted and ignored: ``single_file_per_rank`` (one
    file per rank, always), ``thread_count`` and ``per_thread_copy_ahead`` (each rank writes its
    file sequentially), ``sync_files`` (always fsynced: the commit protocol needs it),
    ``cache_staged_state_dict``, ``serialization_format`` (raw tensor bytes, JSON for the
    rest). ``_extensions`` (stream transforms such as compression) are not supported; a
    non-empty list is refused rather than silently skipped.

    ``step`` (default: from a ``step-NNNNNNNN`` directory name, else 0), ``extra`` and
    ``block_size_bytes`` go into the manifest; ``on_phase`` observes the commit protocol (see
    ``PhaseCallback``); ``pool`` (``CheckpointManager``'s) lends recycled rank files to
    overwrite in place. Build a new writer per save (or ``reset`` it).
    """

    def __init__(
        self,
        path: str | os.PathLike | Storage,
        *,
        overwrite: bool = True,
        step: int | None = None,
        extra: dict[str, Any] | None = None,
        block_size_bytes: int = 1 << 15,
        on_phase: PhaseCallback | None = None,
        process_group: dist.ProcessGroup | None = None,
        pool: FilePool | None = None,
        checksum_during_fsync: bool = False,
        hold: bool = False,
        single_file_per_rank: bool = True,
        sync_files: bool = True,
        thread_count: int = 1,
        per_thread_copy_ahead: int = 10_000_000,
        cache_staged_state_dict: bool = False,
        serialization_format: Any = None,
        _extensions: Sequence[Any] | None = None,
    ) -> None:
        super().__init__()
        if _extensions:
            raise ValueError(
                "ShardWriter does not support FileSystemWriter's _extensions (stream "
                "transforms); the format stores raw tensor bytes with block checksums")
        self.directory = as_storage(path)
        self.overwrite = overwrite
        self._step = step
        self.step = step if step is not None else step_of(self.directory)
        self.extra = extra or {}
        self.block_size = block_size_bytes
        self.on_phase = on_phase or (lambda phase: None)
        self.process_group = process_group
        self.pool = pool
        self.checksum_during_fsync = checksum_during_fsync
        """Checksum host tensors during the fsync (faster), not as each is written: only for
        callers whose tensors cannot change until the save returns (``CheckpointManager``),
        not under ``dcp.async_save``, whose background write reads live CPU tensors."""
        self.held: dict[tuple[str, tuple[int, ...]], Any] | None = {} if hold else None
        """With ``hold``: the tensors this rank wrote, by ``(fqn, chunk offsets)``
        (references; see ``peer.HeldShards``)."""
        self.rank = 0
        self.is_coordinator = False
        self.save_id = uuid.uuid4().hex
        self._aside: str | None = None  # the coordinator's: rank files written aside
        # FileSystemWriter's options, accepted for drop-in use; see the class docstring.
        self.ignored_options = {
            "single_file_per_rank": single_file_per_rank, "sync_files": sync_files,
            "thread_count": thread_count, "per_thread_copy_ahead": per_thread_copy_ahead,
            "cache_staged_state_dict": cache_staged_state_dict,
            "serialization_format": serialization_format,
        }

    @property
    def checkpoint_id(self) -> str:
        return self.directory.uri

    # -- StorageWriter protocol --------------------------------------------------------------
    def reset(self, checkpoint_id: str | os.PathLike | Storage | None = None) -> None:
        """As FileSystemWriter's: a ``checkpoint_id`` (a path or URI) replaces the directory;
        every call starts a new save id."""
        if checkpoint_id:
            self.directory = as_storage(checkpoint_id)
            if self._step is None:
                self.step = step_of(self.directory)
        self.save_id = uuid.uuid4().hex

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        if not kwargs.get("use_collectives", True):
            raise CheckpointSaveError(
                "ShardWriter needs dcp.save(use_collectives=True): an elastic_ckpt checkpoint "
                "has one manifest for all ranks, written once every rank's data is durable",
                path=self.directory.uri)
        rank = kwargs.get("rank")
        if rank is None:
            rank = dist.get_rank(self.process_group) if dist.is_initialized() else 0
        self.rank = rank

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        """Every rank, before any rank writes: make the directory, honour ``overwrite``."""
        self.directory.makedirs()
        if not self.overwrite and self.directory.exists(COMMITTED_FILE):
            raise CheckpointSaveError(
                f"{self.directory.uri} holds a committed checkpoint and overwrite=False; "
                "save somewhere else, or pass overwrite=True to replace it",
                path=self.directory.uri)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        """Coordinator only, after every rank planned and before any rank writes. Rewriting a
        committed checkpoint: every rank writes its file aside (``rank-N.bin.<save id>.tmp``)
        and ``finish`` swaps them in, so the committed checkpoint stays whole and committed
        until the new data is durable (a refused leaf or a crash before then costs nothing);
        stale files set aside by an earlier rewrite that died are removed."""
        for name, is_dir in self.directory.listdir():
            if not is_dir and name.endswith(_ASIDE_SUFFIX) and name.startswith("rank-"):
                self.directory.remove(name)
        self._aside = self.save_id if self.directory.exists(COMMITTED_FILE) else None
        return [dataclasses.replace(plan, storage_data=self._aside) for plan in plans]

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        # Every non-tensor leaf is encoded (or refused) before this rank's file is opened.
        objects = json_objects(plan, planner)
        name = rank_filename(self.rank)
        target = name if not plan.storage_data else aside_name(name, plan.storage_data)
        flat_state = getattr(planner, "state_dict", None) or {}
        chunks = ((item.index, self._hold(item.index, planner.resolve_data(item)),
                   placements_of(flat_state.get(item.index.fqn)))
                  for item in plan.items if item.type != WriteItemType.BYTE_IO)
        results = [WriteResult(index=index, size_in_bytes=written.byte_length,
                               storage_data=written)
                   for index, written in write_rank_file(
                       self.directory, self.rank, target, chunks, self.block_size,
                       pool=None if plan.storage_data else self.pool,
                       checksum_during_fsync=self.checksum_during_fsync)]
        for index, text in objects.items():
            results.append(WriteResult(index=index, size_in_bytes=len(text),
                                       storage_data=_Object(text)))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def _hold(self, index: MetadataIndex, tensor: Any) -> Any:
        if self.held is not None:
            self.held[(index.fqn, tuple(index.offset or ()))] = tensor
        return tensor

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator only, after every rank's data is durable: (for a rewrite: un-commit,
        swap the new rank files in), drop rank files of ranks this save does not have, then
        the manifest, then the marker. A crash in between leaves an uncommitted directory."""
        self.on_phase("data_written")
        manifest = self._build_manifest(metadata, [r for rs in results for r in rs],
                                        world_size=len(results))
        if self._aside is not None:
            self.directory.remove(COMMITTED_FILE)
            for rank in range(len(results)):
                final = rank_filename(rank)
                if self.directory.exists(aside_name(final, self._aside)):
                    self.directory.move(aside_name(final, self._aside), final)
                else:  # this rank wrote nothing: no stale data may stay under its name
                    self.directory.remove(final)
        for name, is_dir in self.directory.listdir():
            rank = parse_rank_filename(name)
            if not is_dir and rank is not None and rank >= len(results):
                self.directory.remove(name)
        self.write_commit(manifest)

    def write_commit(self, manifest: Manifest) -> None:
        """The end of the commit protocol, once every rank's data is durable and the manifest
        is built: ``manifest.json``, then ``COMMITTED``, each durable before the next."""
        self.directory.write_atomic(MANIFEST_FILE, manifest.to_json())
        self.on_phase("manifest_written")
        self.directory.write_atomic(COMMITTED_FILE, b"")
        self.on_phase("committed")

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.directory.uri, save_id=self.save_id)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return checkpoint_id_ok(checkpoint_id)

    # -- manifest ----------------------------------------------------------------------------
    def _build_manifest(self, metadata: Metadata, results: list[WriteResult],
                        world_size: int) -> Manifest:
        by_index: dict[MetadataIndex, Any] = {r.index: r.storage_data for r in results}
        tensors: dict[str, TensorEntry] = {}
        objects: dict[str, Any] = {}
        mesh_shape: tuple[int, ...] | None = None
        mesh_dim_names: tuple[str, ...] | None = None
        for fqn, md in metadata.state_dict_metadata.items():
            if not hasattr(md, "chunks"):
                obj = by_index[MetadataIndex(fqn)]
                objects[fqn] = json.loads(obj.json_text)
                continue
            chunks, placements = [], None
            for chunk in md.chunks:
                w: _Written = by_index[MetadataIndex(fqn, chunk.offsets)]
                placements = placements or w.placements
                mesh_shape = mesh_shape or w.mesh_shape
                mesh_dim_names = mesh_dim_names or w.mesh_dim_names
                chunks.append(ChunkEntry(
                    offsets=tuple(chunk.offsets), lengths=tuple(chunk.sizes), file=w.file,
                    byte_offset=w.byte_offset, byte_length=w.byte_length, rank=w.rank,
                    checksums=w.checksums,
                ))
            tensors[fqn] = TensorEntry(dtype=dtype_name(md.properties.dtype),
                                       shape=tuple(md.size), placements=placements,
                                       chunks=chunks)
        return Manifest(
            format_version=FORMAT_VERSION,
            step=self.step,
            world_size=world_size,
            mesh_shape=mesh_shape or (world_size,),
            mesh_dim_names=mesh_dim_names,
            created_unix_s=time.time(),
            versions={"elastic_ckpt": _version(), "torch": torch.__version__},
            block_size_bytes=self.block_size,
            tensors=tensors,
            objects=objects,
            flatten_mappings={k: tuple(v) for k, v in (metadata.planner_data or {}).items()},
            extra=self.extra,
        )


def write_rank_file(directory: Storage, rank: int, target: str,
                    chunks: Iterable[tuple[MetadataIndex, torch.Tensor, tuple]],
                    block_size: int, pool: FilePool | None = None,
                    checksum_during_fsync: bool = False,
                    ) -> list[tuple[MetadataIndex, _Written]]:
    """Write one rank's chunks, in order, into ``target`` (durable when this returns) and say
    where each landed, with its block checksums. ``chunks`` yields (index, tensor, the
    ``placements_of`` triple); the storage data names the rank's final file name, whatever
    ``target`` is (a rewrite writes aside first). With a ``pool``, ``target`` is a recycled
    file overwritten in place when the pool has one.

    ``checksum_during_fsync``: the caller guarantees the chunks do not change until this
    returns (private staging buffers, a blocking save); contiguous host chunks are then
    checksummed from memory while another thread runs the fsync instead of while they are
    written, which leaves the write syscalls the cores. Otherwise (and for chunks that had to
    be copied: from a device, or not contiguous; and on object stores, whose fsync is the
    upload at close) each chunk is checksummed as it is written, from the bytes written."""
    name = rank_filename(rank)
    # (index, offset, length, checksums or None, the bytes when None, placements triple)
    written: list[tuple[MetadataIndex, int, int, Any, Any, tuple]] = []
    in_place = pool is not None and pool.take(rank, directory, target)
    with directory.open_write(target, in_place=in_place) as out, \
            ThreadPoolExecutor(1, thread_name_prefix="ckpt-fsync") as helper:
        for index, tensor, meta in chunks:
            # Otherwise checksummed now: a copy (from a device, or of a non-contiguous tensor)
            # can then be freed after its write.
            resident = (checksum_during_fsync and directory.is_local
                        and tensor.device.type == "cpu" and tensor.is_contiguous())
            data = tensor_bytes(tensor if tensor.device.type == "cpu" else tensor.to("cpu"))
            offset = out.offset
            sums = None  # host memory: checksummed during the fsync below
            if resident:
                out.write(data)
            elif len(data) >= _OVERLAP_BYTES:
                future = helper.submit(checksum.block_checksums, data, block_size)
                out.write(data)
                sums = future.result()
            else:
                out.write(data)
                sums = checksum.block_checksums(data, block_size)
            written.append((index, offset, len(data), sums, data if resident else None, meta))
        flushed = helper.submit(out.sync)
        try:
            final = [(index, offset, length,
                      checksum.block_checksums(data, block_size) if sums is None else sums, meta)
                     for index, offset, length, sums, data, meta in written]
        finally:
            flushed.result()
    return [(index, _Written(file=name, byte_offset=offset, byte_length=length, rank=rank,
                             checksums=checksum.encode(sums), placements=placements,
                             mesh_shape=mesh, mesh_dim_names=axes))
            for index, offset, length, sums, (placements, mesh, axes) in final]


_OVERLAP_BYTES = 1 << 20
"""Chunks checksummed as they are written are, from this size up, checksummed on a second
thread during their write."""


_ASIDE_SUFFIX = ".tmp"


def aside_name(name: str, save_id: str) -> str:
    """Where a rewrite of a committed checkpoint writes ``name`` until ``finish``."""
    return f"{name}.{save_id}{_ASIDE_SUFFIX}"


def as_storage(path: str | os.PathLike | Storage) -> Storage:
    """A checkpoint location as DCP users give it (path, ``file://`` or ``pyarrow.fs`` URI)."""
    if isinstance(path, Storage):
        return path
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if not isinstance(path, str):
        raise TypeError(f"checkpoint location must be a path or URI string, got {path!r}")
    return Storage(path)


def step_of(directory: Storage) -> int:
    """The step a ``step-NNNNNNNN`` directory is named for (what ``CheckpointManager``
    requires its manifest to say); 0 for any other name."""
    step = parse_step_dirname(directory.root.rstrip("/").rsplit("/", 1)[-1])
    return 0 if step is None else step


_URI_SCHEMES = frozenset({"s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss"})


def checkpoint_id_ok(checkpoint_id: Any) -> bool:
    """FileSystemWriter's rule (a ``Path``; a path with an existing writable parent) for local
    locations, plus any URI whose scheme ``pyarrow.fs`` opens (checked without connecting)."""
    if isinstance(checkpoint_id, Path):
        return True
    if isinstance(checkpoint_id, Storage):
        return True
    if not isinstance(checkpoint_id, (str, os.PathLike)):
        return False
    text = os.fspath(checkpoint_id)
    if "://" in text:
        scheme, rest = text.split("://", 1)
        if scheme != "file":
            return scheme in _URI_SCHEMES
        text = rest
    return any(p.exists() and os.access(p, os.W_OK) for p in Path(text).parents)


def json_objects(plan: SavePlan, planner: SavePlanner) -> dict[MetadataIndex, str]:
    """The JSON text of every non-tensor leaf this rank writes, by index. Taken from the
    planner's state dict (never from the bytes ``resolve_data`` gives: DCP's default planners
    ``torch.save`` them). Every non-tensor leaf this rank holds is checked, also those that
    deduplication gave to another rank, so a refused leaf raises on every rank holding it."""
    state = getattr(planner, "state_dict", None)
    if isinstance(state, Mapping):
        check_json_leaves(state)
    out = {}
    for item in plan.items:
        if item.type == WriteItemType.BYTE_IO:
            out[item.index] = _object_json(item, planner)
    return out


def _object_json(item: WriteItem, planner: SavePlanner) -> str:
    fqn = item.index.fqn
    lookup = getattr(planner, "lookup_object", None)
    if lookup is not None:  # DefaultSavePlanner and its subclasses (ours included)
        return dumps_value(lookup(item.index), fqn).decode()
    data = planner.resolve_data(item)
    raw = data.getvalue() if hasattr(data, "getvalue") else bytes(data.read())
    try:
        text = raw.decode()
        json.loads(text)
    except ValueError:  # UnicodeDecodeError included
        raise NotCheckpointableError(
            f"{fqn}: {type(planner).__name__} serialized this non-tensor value as "
            f"{len(raw)} bytes that are not JSON (a torch.save pickle?); elastic_ckpt stores "
            "non-tensor values as JSON only. Use a planner derived from DefaultSavePlanner "
            "or elastic_ckpt's JsonSavePlanner.", key=fqn) from None
    return text


def _version() -> str:
    from elastic_ckpt import __version__  # noqa: PLC0415 - avoid an import cycle at load

    return __version__
