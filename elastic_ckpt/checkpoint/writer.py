"""``ShardWriter``: a DCP ``StorageWriter`` for the elastic_ckpt format.

Each rank streams its chunks as raw bytes into one file, ``rank-NNNNN.bin``, computing block
checksums on the way, and fsyncs it. The coordinator rank then writes ``manifest.json``
(atomically, durably) and only then the ``COMMITTED`` marker. A crash anywhere before the
marker leaves debris that readers ignore.
"""

from __future__ import annotations

import dataclasses
import json
import time
from torch.futures import Future
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult

from elastic_ckpt.checkpoint import checksum
from elastic_ckpt.checkpoint.manifest import (
    COMMITTED_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    ChunkEntry,
    Manifest,
    TensorEntry,
    dtype_name,
    rank_filename,
)
from elastic_ckpt.checkpoint.planners import placements_of
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
    """Writes one checkpoint directory. Build a new one per save.

    ``step``, ``world_size`` and ``extra`` go into the manifest; ``on_phase`` observes the
    commit protocol (see ``PhaseCallback``).
    """

    def __init__(
        self,
        directory: Storage,
        *,
        step: int,
        extra: dict[str, Any] | None = None,
        block_size_bytes: int = 1 << 15,
        on_phase: PhaseCallback | None = None,
        process_group: dist.ProcessGroup | None = None,
    ) -> None:
        super().__init__()
        self.directory = directory
        self.step = step
        self.extra = extra or {}
        self.block_size = block_size_bytes
        self.on_phase = on_phase or (lambda phase: None)
        self.process_group = process_group
        self.rank = 0

    # -- StorageWriter protocol --------------------------------------------------------------
    def reset(self, checkpoint_id=None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = dist.get_rank(self.process_group) if dist.is_initialized() else 0

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        results: list[WriteResult] = []
        name = rank_filename(self.rank)
        flat_state = getattr(planner, "state_dict", {})
        tensor_items = [i for i in plan.items if i.type != WriteItemType.BYTE_IO]
        with self.directory.open_write(name) as out:
            for item in tensor_items:
                tensor = planner.resolve_data(item)
                if tensor.device.type != "cpu":
                    tensor = tensor.to("cpu")
                data = tensor_bytes(tensor)
                offset = out.offset
                out.write(data)
                placements, mesh, axes = placements_of(flat_state.get(item.index.fqn))
                written = _Written(
                    file=name, byte_offset=offset, byte_length=len(data), rank=self.rank,
                    checksums=checksum.encode(checksum.block_checksums(data, self.block_size)),
                    placements=placements, mesh_shape=mesh, mesh_dim_names=axes,
                )
                results.append(WriteResult(index=item.index, size_in_bytes=len(data),
                                           storage_data=written))
        for item in plan.items:
            if item.type == WriteItemType.BYTE_IO:
                text = planner.resolve_data(item).getvalue().decode()
                results.append(WriteResult(index=item.index, size_in_bytes=len(text),
                                           storage_data=_Object(text)))
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        """Coordinator only, after every rank's data is durable: manifest, then marker."""
        self.on_phase("data_written")
        manifest = self._build_manifest(metadata, [r for rs in results for r in rs])
        self.directory.write_atomic(MANIFEST_FILE, manifest.to_json())
        self.on_phase("manifest_written")
        self.directory.write_atomic(COMMITTED_FILE, b"")
        self.on_phase("committed")

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=self.directory.uri)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id) -> bool:
        return False

    # -- manifest ----------------------------------------------------------------------------
    def _build_manifest(self, metadata: Metadata, results: list[WriteResult]) -> Manifest:
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
        world_size = dist.get_world_size(self.process_group) if dist.is_initialized() else 1
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


def _version() -> str:
    from elastic_ckpt import __version__  # noqa: PLC0415 - avoid an import cycle at load

    return __version__
