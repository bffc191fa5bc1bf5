"""``ShardReader``: a DCP ``StorageReader`` that reads exactly the byte ranges a rank needs.

DCP's planner decides *what* each rank needs (``ReadItem``: a box of a saved chunk). For a box
that is a run of whole rows of the chunk (every dim-0 re-shard) that is one contiguous byte
range, read straight into the destination tensor's memory. The only extra bytes read are the
parts of the first and last checksum block outside the range, so every byte read is verified.
"""

from __future__ import annotations

import dataclasses
import io
import json
import math
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    StorageMeta,
    TensorProperties,
    TensorStorageMetadata,
)
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from elastic_ckpt.checkpoint import checksum
from elastic_ckpt.checkpoint.manifest import (
    MANIFEST_FILE,
    ChunkEntry,
    Manifest,
    TensorEntry,
    decode_json_value,
    is_whole_rows,
)
from elastic_ckpt.checkpoint.planners import JsonLoadPlanner
from elastic_ckpt.checkpoint.writer import as_storage, checkpoint_id_ok
from elastic_ckpt.errors import CheckpointCorruptError, StorageError
from elastic_ckpt.storage import Storage
from elastic_ckpt.storage.fs import retrying


@dataclasses.dataclass
class ReadStats:
    """Bytes this rank needed vs. read from storage (read amplification = read / needed)."""

    bytes_needed: int = 0
    bytes_read: int = 0
    bytes_from_peers: int = 0
    """Of ``bytes_needed``, those taken from peers' memory (``peer.PeerShardReader``)."""

    @property
    def amplification(self) -> float:
        needed = self.bytes_needed - self.bytes_from_peers
        return self.bytes_read / needed if needed else 1.0


def check_inside(directory: Storage, name: str) -> None:
    """Refuse a file of a local checkpoint directory that is a symlink leading out of it: a
    checkpoint only ever reads its own files (``CheckpointCorruptError``)."""
    if not directory.is_local:
        return
    real = os.path.realpath(directory.path(name))
    base = os.path.realpath(directory.path())
    if os.path.commonpath([real, base]) != base:
        raise CheckpointCorruptError(
            f"{directory.uri_of(name)} is a link to {real}, outside the checkpoint directory; "
            "a checkpoint only reads its own files. Replace it with the real file or load "
            "an older checkpoint.", file=name)


def read_manifest(directory: Storage) -> Manifest:
    check_inside(directory, MANIFEST_FILE)
    try:
        data = directory.read_bytes(MANIFEST_FILE)
    except StorageError as exc:
        raise CheckpointCorruptError(
            f"{directory.uri_of(MANIFEST_FILE)} cannot be read ({exc})", file=MANIFEST_FILE
        ) from exc
    return Manifest.from_json(data, directory.uri_of(MANIFEST_FILE))


def to_dcp_metadata(manifest: Manifest) -> Metadata:
    """The DCP view of a manifest, so DCP's planners can plan the re-shard."""
    sd_md: dict[str, Any] = {}
    for fqn, t in manifest.tensors.items():
        sd_md[fqn] = TensorStorageMetadata(
            properties=TensorProperties(dtype=t.torch_dtype),
            size=torch.Size(t.shape),
            chunks=[ChunkStorageMetadata(offsets=torch.Size(c.offsets),
                                         sizes=torch.Size(c.lengths)) for c in t.chunks],
        )
    for fqn in manifest.objects:
        sd_md[fqn] = BytesStorageMetadata()
    return Metadata(state_dict_metadata=sd_md,
                    planner_data={k: tuple(v) for k, v in manifest.flatten_mappings.items()})


class ChunkReader:
    """Verified ranged reads of chunks from one checkpoint directory (not DCP-specific; also
    used by ``verify`` and ``export``). Thread-safe."""

    def __init__(self, directory: Storage, manifest: Manifest, *,
                 check_extents: bool = False) -> None:
        self.directory = directory
        self.manifest = manifest
        self.block_size = manifest.block_size_bytes
        for name in {c.file for t in manifest.tensors.values() for c in t.chunks}:
            check_inside(directory, name)
        if check_extents:
            self._check_extents()

    def _check_extents(self) -> None:
        """Every file holds the bytes its chunks declare: checked (one stat per file) before
        a reader that allocates buffers of declared sizes (``verify``, ``export``) starts,
        so a manifest cannot make it allocate more than the files hold."""
        sizes: dict[str, int | None] = {}
        for fqn, t in self.manifest.tensors.items():
            for c in t.chunks:
                if c.file not in sizes:
                    sizes[c.file] = self.directory.size(c.file)
                size = sizes[c.file]  # None: missing, reported when it is read
                if size is not None and c.byte_offset + c.byte_length > size:
                    raise self._truncated(fqn, c, 0, c.byte_length)

    def read_range(self, fqn: str, chunk: ChunkEntry, start: int, dest) -> int:
        """Fill ``dest`` (a writable buffer) with bytes ``[start, start + len(dest))`` of the
        chunk and verify every block touched. Returns the bytes read from storage."""
        view = memoryview(dest).cast("B")
        stop = start + len(view)
        lo, hi = checksum.block_span(start, stop, chunk.byte_length, self.block_size)
        head, tail = bytearray(start - lo), bytearray(hi - stop)
        segments = [(lo, memoryview(head)), (start, view), (stop, memoryview(tail))]
        def read() -> None:
            with self.directory.open_read(chunk.file) as f:
                for seg_start, buf in segments:
                    if len(buf) and f.read_into(chunk.byte_offset + seg_start, buf) != len(buf):
                        raise self._truncated(fqn, chunk, seg_start, len(buf))

        try:
            retrying(f"reading tensor {fqn!r} from {self.directory.uri_of(chunk.file)}", read,
                     remote=not self.directory.is_local)
        except StorageError as exc:
            missing = getattr(exc, "missing", False)
            if not missing and not self.directory.is_local:  # an outage: not corruption
                raise StorageError(
                    f"{exc.message}; it holds tensor {fqn!r} (chunk at offsets "
                    f"{list(chunk.offsets)}). The checkpoint may be intact: retry once the "
                    "storage is reachable.", **exc.details) from exc
            what = "is missing" if missing else f"cannot be read ({exc})"
            raise CheckpointCorruptError(
                f"{self.directory.uri_of(chunk.file)} {what}; it holds tensor {fqn!r} "
                f"(chunk at offsets {list(chunk.offsets)}). Load an older checkpoint.",
                file=chunk.file, tensor=fqn) from exc
        self._verify(fqn, chunk, lo, hi, segments)
        return hi - lo

    def _verify(self, fqn, chunk, lo, hi, segments) -> None:
        sums = checksum.decode(chunk.checksums)
        bs = self.block_size
        blocks = range(lo // bs, -(-hi // bs))
        # The blocks wholly inside the caller's buffer (all but the edge blocks): checksummed
        # in one pass and compared at once.
        main_start, main = segments[1]
        main_stop = main_start + len(main)
        first = -(-main_start // bs)
        stop_block = main_stop // bs if main_stop < chunk.byte_length else blocks.stop
        if first < stop_block:
            inner_lo, inner_hi = first * bs, min(stop_block * bs, chunk.byte_length)
            got = checksum.block_checksums(main[inner_lo - main_start:inner_hi - main_start], bs)
            bad = np.flatnonzero(got != sums[first:stop_block])
            if len(bad):
                raise self._mismatch(fqn, chunk, first + int(bad[0]))
            blocks = [b for b in blocks if not first <= b < stop_block]
        for block in blocks:
            b_lo, b_hi = block * bs, min((block + 1) * bs, chunk.byte_length)
            value = 0
            for seg_start, buf in segments:
                a, b = max(b_lo, seg_start), min(b_hi, seg_start + len(buf))
                if a < b:
                    value = checksum.crc(buf[a - seg_start:b - seg_start], value)
            if value != int(sums[block]):
                raise self._mismatch(fqn, chunk, block)

    def _mismatch(self, fqn, chunk, block: int) -> CheckpointCorruptError:
        b_lo = block * self.block_size
        b_hi = min(b_lo + self.block_size, chunk.byte_length)
        return CheckpointCorruptError(
            f"checksum mismatch in {self.directory.uri_of(chunk.file)} at bytes "
            f"[{chunk.byte_offset + b_lo}, {chunk.byte_offset + b_hi}) — tensor {fqn!r}, "
            f"chunk at offsets {list(chunk.offsets)}, block {block}. The file is "
            "corrupt; load an older checkpoint.", file=chunk.file, tensor=fqn)

    def _truncated(self, fqn, chunk, seg_start, n) -> CheckpointCorruptError:
        size = self.directory.size(chunk.file)
        return CheckpointCorruptError(
            f"{self.directory.uri_of(chunk.file)} is truncated: tensor {fqn!r} needs bytes "
            f"[{chunk.byte_offset + seg_start}, {chunk.byte_offset + seg_start + n}) but the "
            f"file has {size} bytes. Load an older checkpoint.", file=chunk.file, tensor=fqn)

    def read_rows(self, fqn: str, entry: TensorEntry, chunk: ChunkEntry, row0: int,
                  nrows: int, out: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
        """Rows ``[row0, row0 + nrows)`` (dim 0) of a chunk as a tensor shaped like the chunk
        (into ``out`` when given: CPU, contiguous, right dtype and shape)."""
        shape = (nrows, *chunk.lengths[1:]) if chunk.lengths else ()
        if out is None:
            out = torch.empty(shape, dtype=entry.torch_dtype)
        elif not (out.is_contiguous() and out.device.type == "cpu"
                  and out.dtype == entry.torch_dtype):
            raise ValueError("read_rows(out=...) needs a contiguous CPU tensor of the chunk's "
                             "dtype; the bytes would land in a temporary copy otherwise")
        row_bytes = math.prod(chunk.lengths[1:]) * entry.itemsize if chunk.lengths else 0
        start = row0 * row_bytes if chunk.lengths else 0
        nread = self.read_range(fqn, chunk, start, out.reshape(-1).view(torch.uint8).numpy())
        return out, nread


class ShardReader(StorageReader):
    """Reads one committed checkpoint directory: a drop-in for DCP's ``FileSystemReader``.

    ```python
    dcp.load(state_dict, storage_reader=ShardReader("s3://bucket/run/step-00000100"))
    ```
    ``path``: a local path, ``file://`` or ``pyarrow.fs`` URI (or a ``Storage``); a
    ``checkpoint_id`` given to ``dcp.load`` replaces it (``reset``). A directory without
    ``COMMITTED`` (a crashed or running save) or marked ``CORRUPT`` is refused. Works with
    DCP's ``DefaultLoadPlanner`` and ``JsonLoadPlanner``: non-tensor leaves are stored as JSON
    and decoded from it; for planners other than ``JsonLoadPlanner`` the decoded value is
    handed over ``torch.save``d, which ``DefaultLoadPlanner.load_bytes`` expects (a pickle this
    process makes of plain JSON values, never bytes from storage). ``_extension_registry`` is
    accepted and ignored (the format has no stream transforms). Build a new reader per load
    (or ``reset`` it).
    """

    def __init__(self, path: str | os.PathLike | Storage, manifest: Manifest | None = None,
                 num_threads: int = 4, *, _extension_registry: Any = None) -> None:
        super().__init__()
        self.directory = as_storage(path)
        self.manifest = manifest
        self.num_threads = num_threads
        self.stats = ReadStats()
        self.load_id = uuid.uuid4().hex

    @property
    def checkpoint_id(self) -> str:
        return self.directory.uri

    def reset(self, checkpoint_id: str | os.PathLike | Storage | None = None) -> None:
        """As FileSystemReader's: a ``checkpoint_id`` replaces the directory (and forgets the
        manifest read from the old one); every call starts a new load id."""
        if checkpoint_id:
            self.directory = as_storage(checkpoint_id)
            self.manifest = None
        self.stats = ReadStats()
        self.load_id = uuid.uuid4().hex

    # No **kwargs: DCP then never asks for rank-local metadata (one manifest serves all ranks).
    def read_metadata(self, *args: Any) -> Metadata:
        if self.manifest is None:
            # catalog imports this module (read_manifest); imported here to avoid the cycle.
            from elastic_ckpt.checkpoint.catalog import open_checkpoint  # noqa: PLC0415

            _, self.manifest = open_checkpoint(self.directory)
        metadata = to_dcp_metadata(self.manifest)
        metadata.storage_meta = StorageMeta(checkpoint_id=self.directory.uri,
                                            load_id=self.load_id)
        return metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args, **kw):
        if self.manifest is None:
            self.read_metadata()
        self._chunks = ChunkReader(self.directory, self.manifest)
        self._index = {(fqn, tuple(c.offsets)): c
                       for fqn, t in self.manifest.tensors.items() for c in t.chunks}

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        tensor_items = []
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                stored = self.manifest.objects[item.storage_index.fqn]
                planner.load_bytes(item, object_bytes(stored, planner))
            else:
                tensor_items.append((item, planner.resolve_tensor(item).detach()))
        # Sorted by file and offset so each file is read front to back.
        tensor_items.sort(key=lambda it: self._sort_key(it[0]))
        if self.num_threads > 1 and len(tensor_items) > 1:
            with ThreadPoolExecutor(self.num_threads, thread_name_prefix="ckpt-read") as pool:
                counts = list(pool.map(lambda it: self._read_item(*it), tensor_items))
        else:
            counts = [self._read_item(*it) for it in tensor_items]
        self.stats.bytes_read += sum(c[0] for c in counts)
        self.stats.bytes_needed += sum(c[1] for c in counts)
        for item, dest in tensor_items:
            planner.commit_tensor(item, dest)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _sort_key(self, item: ReadItem):
        c = self._index[(item.storage_index.fqn, tuple(item.storage_index.offset))]
        return c.file, c.byte_offset

    def _read_item(self, item: ReadItem, dest: torch.Tensor) -> tuple[int, int]:
        """Fill ``dest``; returns ``(bytes read, bytes needed)``."""
        fqn = item.storage_index.fqn
        entry = self.manifest.tensors[fqn]
        chunk = self._index[(fqn, tuple(item.storage_index.offset))]
        offs, lens = tuple(item.storage_offsets), tuple(item.lengths)
        whole_rows = is_whole_rows(offs, lens, chunk.lengths)  # of the chunk
        row0, nrows = (offs[0], lens[0]) if lens else (0, 0)
        direct = (whole_rows and dest.device.type == "cpu" and dest.is_contiguous()
                  and dest.dtype == entry.torch_dtype)
        if direct:
            _, nread = self._chunks.read_rows(fqn, entry, chunk, row0, nrows,
                                              out=dest.view((nrows, *chunk.lengths[1:])
                                                            if lens else ()))
        else:
            rows, nread = self._chunks.read_rows(fqn, entry, chunk, row0, nrows)
            for dim in range(1, len(lens)):
                rows = rows.narrow(dim, offs[dim], lens[dim])
            dest.copy_(rows.reshape(dest.shape))
        return nread, math.prod(lens) * entry.itemsize

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike) -> bool:
        return checkpoint_id_ok(checkpoint_id)


def object_bytes(stored: Any, planner: LoadPlanner) -> io.BytesIO:
    """A stored non-tensor leaf (tagged JSON) as the bytes ``planner.load_bytes`` decodes:
    JSON for ``JsonLoadPlanner``; otherwise ``torch.save`` of the decoded value, which DCP's
    ``DefaultLoadPlanner`` ``torch.load``s (plain containers of JSON values, made here)."""
    if isinstance(planner, JsonLoadPlanner):
        return io.BytesIO(json.dumps(stored).encode())
    buf = io.BytesIO()
    torch.save(decode_json_value(stored), buf)
    buf.seek(0)
    return buf
