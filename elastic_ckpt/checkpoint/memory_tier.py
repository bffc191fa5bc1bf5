"""The peer-memory tier: recover a lost node's shards from the survivors' host memory.

Every ``checkpoint.memory_interval_steps`` each rank of the group takes a *snapshot*
(``MemoryTier.take``, collective, at a step boundary): DCP plans the state as for a save (the
plans are cached while no rank's plan changes, ``plan_cache``) and ``SnapshotWriter`` copies
every chunk this rank writes into one flat host buffer, allocated once and reused. The
non-tensor leaves and the caller's JSON state go to every rank (one all-gather of small
objects). Then each rank sends its buffer, in one message, to its *replica holder*, a rank on
another node (``replica_holders``: ring order by node). So every writer's chunks are in two
processes on two nodes, and with ranks spread evenly over nodes a rank holds its own snapshot
and the replica of one peer: twice its state in host memory.

On a restore (``CheckpointManager.load(..., memory=)``, collective in the new group), every
member offers what it holds (``Offer``) and ``choose`` picks the newest snapshot whose
writers the members hold between them. If it is newer than the latest committed checkpoint,
one member broadcasts the snapshot's metadata and DCP's load planner re-shards it to the new
world size with ``MemoryReader``, which takes each chunk from a member that holds it
(``peer.exchange``); nothing is read from storage. Otherwise (a rank and its replica holder
both gone, or the tier off) the load reads storage as before.

A piece (a rank's own snapshot or a replica) counts as the snapshot of a step only once it
is complete: while it is overwritten by the next snapshot it belongs to no step. A failure in
the middle of a snapshot (its copy or exchange, milliseconds of a step) therefore leaves the
old step incomplete and the new one not yet covered, and that recovery reads storage.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
import uuid
from typing import Any, Iterable

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta
from torch.distributed.checkpoint.planner import (
    LoadItemType,
    LoadPlan,
    LoadPlanner,
    SavePlan,
    SavePlanner,
    WriteItemType,
)
from torch.distributed.checkpoint.storage import StorageReader, StorageWriter, WriteResult
from torch.futures import Future

from elastic_ckpt.checkpoint.collectives import (
    first_failure,
    gather_objects,
    group_rank,
    group_size,
    sum_over_ranks,
)
from elastic_ckpt.checkpoint.peer import (
    ChunkKey,
    Request,
    Wanted,
    box_of,
    global_rank,
    read_from_members,
)
from elastic_ckpt.checkpoint.plan_cache import PlanCache, stage_with_cached_plan
from elastic_ckpt.checkpoint.planners import JsonSavePlanner
from elastic_ckpt.checkpoint.reader import ReadStats, object_bytes
from elastic_ckpt.checkpoint.writer import json_objects

_ALIGN = 16  # every chunk starts 16-byte aligned in a flat buffer: viewable as any dtype


@dataclasses.dataclass(frozen=True)
class Layout:
    """Where each chunk of one writer lies in its flat buffer: ``(key, shape, dtype, byte
    offset)`` in key order. The writer (from its save plan) and its replica holder (from the
    global metadata) compute the same layout, so one message carries every chunk."""

    entries: tuple[tuple[ChunkKey, tuple[int, ...], torch.dtype, int], ...]
    nbytes: int

    @classmethod
    def of(cls, chunks: Iterable[tuple[ChunkKey, tuple[int, ...], torch.dtype]]) -> "Layout":
        entries, at = [], 0
        for key, shape, dtype in sorted(chunks, key=lambda c: c[0]):
            entries.append((key, shape, dtype, at))
            at += -(-math.prod(shape) * dtype.itemsize // _ALIGN) * _ALIGN
        return cls(tuple(entries), at)

    def views(self, flat: torch.Tensor) -> dict[ChunkKey, torch.Tensor]:
        return {key: flat[at:at + math.prod(shape) * dtype.itemsize].view(dtype).view(shape)
                for key, shape, dtype, at in self.entries}


@dataclasses.dataclass
class Piece:
    """One writer's snapshot held by this process: its own or a replica. ``step`` is None
    while the piece is being overwritten (it then belongs to no snapshot)."""

    writer: int
    layout: Layout
    flat: torch.Tensor
    chunks: dict[ChunkKey, torch.Tensor]
    step: int | None = None

    @classmethod
    def allocate(cls, writer: int, layout: Layout, pin: bool) -> "Piece":
        flat = torch.empty(layout.nbytes, dtype=torch.uint8, pin_memory=pin)
        return cls(writer, layout, flat, layout.views(flat))


@dataclasses.dataclass(frozen=True)
class Record:
    """What every rank of the group keeps of its newest snapshot besides the chunks: the
    global metadata DCP planned (``storage_data``: the writer rank of each chunk), every
    non-tensor leaf's JSON text and rank 0's JSON state."""

    group: str
    step: int
    world_size: int
    metadata: Metadata
    objects: dict[str, str]
    extra: dict[str, Any]


@dataclasses.dataclass(frozen=True)
class Offer:
    """What one member of a new group holds of a snapshot: the writers whose pieces it has
    complete for ``step`` of group ``group`` (a group of ``world_size``)."""

    group: str
    step: int
    world_size: int
    writers: frozenset[int]


@dataclasses.dataclass(frozen=True)
class Choice:
    """The snapshot a new group restores: its offer's fields, which member serves each
    writer's chunks, and the member that broadcasts the metadata."""

    group: str
    step: int
    world_size: int
    holders: dict[int, int]
    source: int


@dataclasses.dataclass
class SnapshotStats:
    """One snapshot on this rank: seconds to plan and copy, to exchange replicas, and bytes."""

    step: int
    copy_s: float
    replicate_s: float
    own_bytes: int
    replica_bytes: int

    @property
    def seconds(self) -> float:
        return self.copy_s + self.replicate_s


def choose(offers: list[Offer | None]) -> Choice | None:
    """Pure: the newest snapshot the members of a group hold every writer of between them
    (by member rank: what each offers), or None. Each writer is served by the lowest member
    holding it; the lowest member holding any of it broadcasts the metadata."""
    candidates: dict[tuple[str, int, int], dict[int, int]] = {}
    for member, offer in enumerate(offers):
        if offer is None:
            continue
        served = candidates.setdefault((offer.group, offer.step, offer.world_size), {})
        for writer in sorted(offer.writers):
            served.setdefault(writer, member)
    complete = [(step, group, world, served) for (group, step, world), served
                in candidates.items() if set(served) == set(range(world))]
    if not complete:
        return None
    step, group, world, served = max(complete, key=lambda c: (c[0], c[1]))
    return Choice(group, step, world, served, min(served.values()))


def replica_holders(nodes: list[str]) -> list[int | None]:
    """Pure: by rank, the rank that holds its replica. The ranks stand in a ring ordered by
    (node, rank); a rank's holder is the one as many places on as the largest node has ranks,
    or the first after that on another node: with equal nodes every rank holds exactly one
    replica, from another node. On a single node, the next rank (a process death is still
    covered); None for a group of one."""
    n = len(nodes)
    ring = sorted(range(n), key=lambda r: (nodes[r], r))
    step = max(nodes.count(node) for node in nodes) if nodes else 0
    out: list[int | None] = [None] * n
    for i, rank in enumerate(ring):
        after = [ring[(i + step + j) % n] for j in range(n)]
        after = [r for r in after if r != rank]
        elsewhere = [r for r in after if nodes[r] != nodes[rank]]
        out[rank] = (elsewhere or after or [None])[0]
    return out


class SnapshotWriter(StorageWriter):
    """A DCP ``StorageWriter`` that writes nowhere: ``write_data`` copies each chunk this rank
    writes into the tier's own flat host buffer; ``finish`` (coordinator) records each
    chunk's writer rank as its ``storage_data``, which DCP hands every rank with the
    metadata."""

    def __init__(self, tier: "MemoryTier", rank: int) -> None:
        super().__init__()
        self.tier = tier
        self.rank = rank
        self.objects: dict[str, str] = {}
        self.local_plan: SavePlan | None = None
        self.final_plan: SavePlan | None = None
        self.nbytes = 0

    def reset(self, checkpoint_id: Any = None) -> None:
        pass

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kw: Any) -> None:
        pass

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self.local_plan = plan
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        return plans

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        self.final_plan = plan
        self.objects = {index.fqn: text for index, text in json_objects(plan, planner).items()}
        tensors = [item for item in plan.items if item.type != WriteItemType.BYTE_IO]
        layout = Layout.of(((item.index.fqn, tuple(item.index.offset or ())),
                            tuple(item.tensor_data.chunk.sizes),
                            item.tensor_data.properties.dtype) for item in tensors)
        sources = [planner.resolve_data(item).detach() for item in tensors]
        piece = self.tier.own_piece(self.rank, layout,
                                    pin=any(s.device.type == "cuda" for s in sources))
        for item, src in zip(tensors, sources):
            piece.chunks[(item.index.fqn, tuple(item.index.offset or ()))].copy_(src)
        self.nbytes = layout.nbytes
        results = [WriteResult(index=item.index, size_in_bytes=0, storage_data=self.rank)
                   for item in plan.items]
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        metadata.storage_data = {r.index: r.storage_data for rs in results for r in rs}

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id="memory", save_id=uuid.uuid4().hex)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True


class MemoryTier:
    """One process's part of the peer-memory tier; it outlives the groups the process trains
    in (``TrainWorker`` keeps it). ``node`` names the machine, for the replica ring."""

    def __init__(self, node: str) -> None:
        self.node = node
        self.group: str | None = None
        """The id of the group the next snapshot belongs to (``attach``)."""
        self.own: Piece | None = None
        self.replicas: dict[int, Piece] = {}
        self.record: Record | None = None
        self.last: SnapshotStats | None = None
        self._holders: list[int | None] = []
        self._plans: PlanCache | None = None

    @property
    def nbytes(self) -> int:
        """Host memory this process holds for the tier (its snapshot and replicas)."""
        pieces = [self.own, *self.replicas.values()]
        return sum(p.layout.nbytes for p in pieces if p is not None)

    def attach(self, process_group: dist.ProcessGroup | None = None) -> None:
        """Collective, once per group before its first snapshot: agree on a group id and
        learn every rank's node (the replica ring). Pieces of an earlier group stay until the
        first snapshot of this one replaces them (a restore may still need them)."""
        everyone = gather_objects((self.node, uuid.uuid4().hex), process_group)
        self.group = everyone[0][1]
        self._holders = replica_holders([node for node, _ in everyone])
        self._plans = None

    def own_piece(self, rank: int, layout: Layout, pin: bool) -> Piece:
        """The buffer this rank's next snapshot is copied into (no step until complete)."""
        if self.own is None or self.own.layout != layout or self.own.writer != rank:
            self.own = None  # freed before the new one is allocated
            self.own = Piece.allocate(rank, layout, pin)
        self.own.step = None
        return self.own

    def complete_pieces(self) -> list[Piece]:
        """This process's pieces of its newest snapshot that are complete (own and replicas
        at the record's step)."""
        if self.record is None:
            return []
        return [p for p in (self.own, *self.replicas.values())
                if p is not None and p.step == self.record.step]

    def offer(self) -> Offer | None:
        record, writers = self.record, frozenset(p.writer for p in self.complete_pieces())
        return Offer(record.group, record.step, record.world_size, writers) if writers else None

    # -- the snapshot (collective) -----------------------------------------------------------
    def take(self, step: int, dcp_state: dict[str, Any], extra: dict[str, Any],
             process_group: dist.ProcessGroup | None = None) -> SnapshotStats:
        """Snapshot ``dcp_state`` (and the JSON ``extra``) as step ``step``: plan (cached),
        copy this rank's chunks to host memory, share the small objects, replicate."""
        if self.group is None:
            raise RuntimeError("MemoryTier.take before attach(): no group to snapshot in")
        t0 = time.perf_counter()
        rank, world = group_rank(process_group), group_size(process_group)
        writer, metadata = SnapshotWriter(self, rank), None
        if self._plans is not None:
            metadata = stage_with_cached_plan(
                dcp_state, writer, self._plans, JsonSavePlanner(), rank=rank,
                world_size=world, failure=None,
                count=lambda values: sum_over_ranks(values, process_group),
                first_failure=lambda exc: first_failure(exc, process_group))
        if metadata is None:
            writer, planner = SnapshotWriter(self, rank), JsonSavePlanner()
            metadata = dcp.save(dcp_state, storage_writer=writer, planner=planner,
                                process_group=process_group)
            self._plans = PlanCache.of(writer, planner, metadata, rank, world, token="")
        self.own.step = step
        shared = gather_objects((writer.objects, extra if rank == 0 else None), process_group)
        objects = {fqn: text for theirs, _ in shared for fqn, text in theirs.items()}
        self.record = Record(self.group, step, world, metadata, objects, shared[0][1])
        copied = time.perf_counter()
        received = self._replicate(rank, metadata, step, process_group)
        self.last = SnapshotStats(step, copied - t0, time.perf_counter() - copied,
                                  writer.nbytes, received)
        return self.last

    def _replicate(self, me: int, metadata: Metadata, step: int,
                   group: dist.ProcessGroup | None) -> int:
        """Send this rank's piece to its replica holder and receive the pieces this rank
        holds, each in one message. Returns the bytes received."""
        writers = [w for w, holder in enumerate(self._holders) if holder == me]
        for stale in set(self.replicas) - set(writers):
            del self.replicas[stale]
        ops, received = [], []
        holder = self._holders[me] if self._holders else None
        if holder is not None and self.own.layout.nbytes:
            ops.append(dist.P2POp(dist.isend, self.own.flat, global_rank(holder, group), group))
        for writer in writers:
            layout = layout_of(metadata, writer)
            piece = self.replicas.get(writer)
            if piece is None or piece.layout != layout:
                self.replicas.pop(writer, None)
                piece = self.replicas[writer] = Piece.allocate(writer, layout, pin=False)
            piece.step = None
            if layout.nbytes:
                ops.append(dist.P2POp(dist.irecv, piece.flat, global_rank(writer, group),
                                      group))
            received.append(piece)
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for piece in received:
            piece.step = step
        return sum(p.layout.nbytes for p in received)

    # -- the restore (collective) ------------------------------------------------------------
    def agree(self, process_group: dist.ProcessGroup | None = None) -> Choice | None:
        """Collective: the snapshot this group can restore from its members' memory."""
        return choose(gather_objects(self.offer(), process_group))

    def reader(self, choice: Choice, process_group: dist.ProcessGroup | None = None
               ) -> tuple["MemoryReader", Record]:
        """Collective: the chosen snapshot's record (from ``choice.source``) and a reader
        that loads it from the members' memory."""
        me = group_rank(process_group)
        mine = self.record if me == choice.source else None
        box = [mine]
        if group_size(process_group) > 1:
            dist.broadcast_object_list(box, src=global_rank(choice.source, process_group),
                                       group=process_group)
        record: Record = box[0]
        chunks: dict[ChunkKey, torch.Tensor] = {}
        if self.record is not None and (self.record.group, self.record.step) == (
                choice.group, choice.step):
            for piece in self.complete_pieces():
                chunks.update(piece.chunks)
        return MemoryReader(record, chunks, choice.holders, process_group), record


def layout_of(metadata: Metadata, writer: int) -> Layout:
    """The flat-buffer layout of ``writer``'s chunks, from a snapshot's global metadata."""
    chunks = []
    for index, owner in (metadata.storage_data or {}).items():
        md = metadata.state_dict_metadata[index.fqn]
        if owner != writer or not hasattr(md, "chunks"):
            continue
        offsets = tuple(index.offset or ())
        sizes = next(tuple(c.sizes) for c in md.chunks if tuple(c.offsets) == offsets)
        chunks.append(((index.fqn, offsets), sizes, md.properties.dtype))
    return Layout.of(chunks)


class MemoryReader(StorageReader):
    """A DCP ``StorageReader`` over a snapshot held in the group's memory: each chunk comes
    from the member ``holders`` names for its writer (collective; every rank of the group
    reads with one). ``stats.bytes_from_peers`` counts what this rank received or copied."""

    def __init__(self, record: Record, chunks: dict[ChunkKey, torch.Tensor],
                 holders: dict[int, int], process_group: dist.ProcessGroup | None) -> None:
        super().__init__()
        self.record = record
        self.chunks = chunks
        self.holders = holders
        self.process_group = process_group
        self.stats = ReadStats()

    def reset(self, checkpoint_id: Any = None) -> None:
        self.stats = ReadStats()

    def read_metadata(self, *args: Any) -> Metadata:
        return self.record.metadata

    def set_up_storage_reader(self, metadata: Metadata, is_coordinator: bool, *args: Any,
                              **kw: Any) -> None:
        pass

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        writers = self.record.metadata.storage_data
        wanted: Wanted = {}
        for item in plan.items:
            fqn = item.storage_index.fqn
            if item.type == LoadItemType.BYTE_IO:
                planner.load_bytes(item, object_bytes(json.loads(self.record.objects[fqn]),
                                                      planner))
                continue
            chunk = tuple(item.storage_index.offset)
            member = self.holders[writers[MetadataIndex(fqn, chunk)]]
            request = Request(fqn, chunk, tuple(item.storage_offsets), tuple(item.lengths))
            wanted.setdefault(member, []).append(
                (item, planner.resolve_tensor(item).detach(), request))
        return read_from_members(group_rank(self.process_group), wanted,
                                 lambda r: box_of(self.chunks[(r.fqn, r.chunk)], r),
                                 self.stats, planner, self.process_group)

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: Any) -> bool:
        return True
