"""Re-shard from the memory of the processes that wrote a checkpoint instead of from storage.

A process that saved checkpoint ``uri`` and then stopped training (a resize) still holds, in
its tensors, every chunk it wrote: ``HeldShards``. When a new group of processes loads that
checkpoint, ``PeerShardReader`` (a ``ShardReader``) gets each chunk whose writer is a member
of the new group from that member over the new process group, and reads only the others from
storage. DCP's load planner still decides what each rank needs (the re-shard arithmetic);
only where the bytes come from changes. The bytes sent are those of the tensors that were
written, so a peer load is bit-identical to a storage load of the same checkpoint.

The exchange (``exchange``, also used by the peer-memory tier's reader) is collective: every
rank of the group runs it inside ``dcp.load``'s read step.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from elastic_ckpt.checkpoint.collectives import gather_objects
from elastic_ckpt.checkpoint.reader import ReadStats, ShardReader

ChunkKey = tuple[str, tuple[int, ...]]
"""``(fqn, chunk offsets)``: a chunk as the manifest names it."""


@dataclasses.dataclass
class HeldShards:
    """The chunks this process wrote to checkpoint ``uri`` as rank ``rank``: the tensors that
    were written, by ``(fqn, chunk offsets)``. Valid while nothing changes them (the process
    stopped training after the save); references, not copies."""

    uri: str
    rank: int
    chunks: dict[ChunkKey, torch.Tensor]


def holders(held: HeldShards | None, uri: str, group: dist.ProcessGroup | None
            ) -> dict[int, int]:
    """Collective: ``{writer rank: rank in this group}`` for the members that hold their
    chunks of checkpoint ``uri`` (empty without a process group)."""
    if not dist.is_initialized():
        return {}
    mine = held.rank if held is not None and held.uri == uri else None
    return {writer: member for member, writer in enumerate(gather_objects(mine, group))
            if writer is not None}


@dataclasses.dataclass(frozen=True)
class Request:
    """A box of a chunk, as one rank asks another for it."""

    fqn: str
    chunk: tuple[int, ...]
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]


Wanted = dict[int, list[tuple[ReadItem, torch.Tensor, Request]]]
"""By member of the group: the read items this rank takes from it, their destination
tensors and what to ask for."""


class PeerShardReader(ShardReader):
    """A ``ShardReader`` that takes the chunks written by a member of this group from that
    member's memory (``held`` on the member, ``holders`` the same on every rank). Every rank
    of the group must read with one (collective). ``stats.bytes_from_peers`` counts the bytes
    this rank received or copied from held tensors, ``stats.bytes_read`` those from storage."""

    def __init__(self, *args: Any, held: HeldShards | None, holders: dict[int, int],
                 process_group: dist.ProcessGroup | None = None, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.held = held if held is not None and held.rank in holders else None
        self.holders = holders
        self.process_group = process_group

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        me = dist.get_rank(self.process_group)
        from_peers: Wanted = {}
        from_storage = []
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                from_storage.append(item)
                continue
            fqn, chunk = item.storage_index.fqn, tuple(item.storage_index.offset)
            member = self.holders.get(self._index[(fqn, chunk)].rank)
            if member is None:
                from_storage.append(item)
                continue
            dest = planner.resolve_tensor(item).detach()
            request = Request(fqn, chunk, tuple(item.storage_offsets), tuple(item.lengths))
            from_peers.setdefault(member, []).append((item, dest, request))
        super().read_data(dataclasses.replace(plan, items=from_storage), planner).wait()
        return read_from_members(me, from_peers, self._box, self.stats, planner,
                                 self.process_group)

    def _box(self, request: Request) -> torch.Tensor:
        """The requested box of a held chunk, contiguous."""
        if self.held is None:
            raise RuntimeError(f"asked for tensor {request.fqn!r} but holds no chunks")
        return box_of(self.held.chunks[(request.fqn, request.chunk)], request)


def exchange(me: int, wanted: Wanted, box: Callable[[Request], torch.Tensor],
             count: Callable[[int], None], group: dist.ProcessGroup | None) -> None:
    """Collective: fill every destination in ``wanted`` from the member that holds it. An
    all-gather of the requests, then one message per pair of ranks with bytes to move
    (``batch_isend_irecv``), the boxes packed back to back, each 16-byte aligned. ``box``
    gives the contiguous box this rank holds for a request (a peer's or its own); ``count``
    is told the bytes of each destination filled."""
    requests = {member: [r for _, _, r in items] for member, items in wanted.items()}
    everyone = gather_objects(requests, group)
    ops, receives = [], []
    for peer, theirs in enumerate(everyone):
        asked = theirs.get(me, [])
        if peer == me or not asked:
            continue
        parts = []
        for request in asked:
            data = box(request).reshape(-1).view(torch.uint8)
            parts += [data, data.new_zeros(_padded(data.numel()) - data.numel())]
        ops.append(dist.P2POp(dist.isend, torch.cat(parts), global_rank(peer, group), group))
    for member, items in wanted.items():
        if member == me:
            for _, dest, request in items:
                dest.copy_(box(request))
                count(dest.numel() * dest.element_size())
            continue
        nbytes = sum(_padded(math.prod(r.lengths) * d.element_size()) for _, d, r in items)
        buffer = torch.empty(nbytes, dtype=torch.uint8, device=items[0][1].device)
        ops.append(dist.P2POp(dist.irecv, buffer, global_rank(member, group), group))
        receives.append((buffer, items))
    if ops:
        for work in dist.batch_isend_irecv(ops):
            work.wait()
    for buffer, items in receives:
        at = 0
        for _, dest, request in items:
            n = math.prod(request.lengths) * dest.element_size()
            dest.copy_(buffer[at:at + n].view(dest.dtype).view(request.lengths))
            count(n)
            at += _padded(n)


def read_from_members(me: int, wanted: Wanted, box: Callable[[Request], torch.Tensor],
                      stats: ReadStats, planner: LoadPlanner,
                      group: dist.ProcessGroup | None) -> Future[None]:
    """A reader's collective step: ``exchange``, then every destination committed to the
    planner; the bytes count as ``stats.bytes_from_peers``. Returns a done future."""
    def count(nbytes: int) -> None:
        stats.bytes_from_peers += nbytes
        stats.bytes_needed += nbytes

    exchange(me, wanted, box, count, group)
    for items in wanted.values():
        for item, dest, _ in items:
            planner.commit_tensor(item, dest)
    future: Future[None] = Future()
    future.set_result(None)
    return future


def box_of(chunk: torch.Tensor, request: Request) -> torch.Tensor:
    """The box ``request`` asks for of the chunk it names, contiguous."""
    for dim, (start, length) in enumerate(zip(request.offsets, request.lengths)):
        chunk = chunk.narrow(dim, start, length)
    return chunk.contiguous()


def _padded(nbytes: int) -> int:
    """Each box starts 16-byte aligned in a message, so it can be viewed as any dtype."""
    return -(-nbytes // 16) * 16


def global_rank(rank: int, group: dist.ProcessGroup | None) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)
