"""Re-shard from the memory of the processes that wrote a checkpoint instead of from storage.

A process that saved checkpoint ``uri`` and then stopped training (a resize) still holds, in
its tensors, every chunk it wrote: ``HeldShards``. When a new group of processes loads that
checkpoint, ``PeerShardReader`` (a ``ShardReader``) gets each chunk whose writer is a member
of the new group from that member over the new process group, and reads only the others from
storage. DCP's load planner still decides what each rank needs (the re-shard arithmetic);
only where the bytes come from changes. The bytes sent are those of the tensors that were
written, so a peer load is bit-identical to a storage load of the same checkpoint.

The exchange is collective (every rank of the group runs it inside ``dcp.load``'s read step):
an all-gather of each rank's requests (small: names and boxes), then one message per pair of
ranks with bytes to move (``batch_isend_irecv``), the requested boxes packed back to back.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner, ReadItem
from torch.futures import Future

from elastic_ckpt.checkpoint.collectives import gather_objects
from elastic_ckpt.checkpoint.reader import ShardReader

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
class _Request:
    fqn: str
    chunk: tuple[int, ...]
    offsets: tuple[int, ...]
    lengths: tuple[int, ...]


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
        from_peers: dict[int, list[tuple[ReadItem, torch.Tensor, _Request]]] = {}
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
            request = _Request(fqn, chunk, tuple(item.storage_offsets), tuple(item.lengths))
            from_peers.setdefault(member, []).append((item, dest, request))
        super().read_data(dataclasses.replace(plan, items=from_storage), planner).wait()
        self._exchange(me, from_peers)
        for wanted in from_peers.values():
            for item, dest, _ in wanted:
                planner.commit_tensor(item, dest)
        future: Future[None] = Future()
        future.set_result(None)
        return future

    def _exchange(self, me: int, wanted: dict[int, list[tuple[ReadItem, torch.Tensor,
                                                                 _Request]]]) -> None:
        group = self.process_group
        requests = {member: [r for _, _, r in items] for member, items in wanted.items()}
        everyone = gather_objects(requests, group)
        ops, receives = [], []
        for peer, theirs in enumerate(everyone):
            asked = theirs.get(me, [])
            if peer == me or not asked:
                continue
            parts = []
            for request in asked:
                data = self._box(request).reshape(-1).view(torch.uint8)
                parts += [data, data.new_zeros(_padded(data.numel()) - data.numel())]
            ops.append(dist.P2POp(dist.isend, torch.cat(parts), _global(peer, group), group))
        for member, items in wanted.items():
            if member == me:
                for _, dest, request in items:
                    dest.copy_(self._box(request))
                    self._count(dest.numel() * dest.element_size())
                continue
            nbytes = sum(_padded(math.prod(r.lengths) * d.element_size()) for _, d, r in items)
            buffer = torch.empty(nbytes, dtype=torch.uint8, device=items[0][1].device)
            ops.append(dist.P2POp(dist.irecv, buffer, _global(member, group), group))
            receives.append((buffer, items))
        if ops:
            for work in dist.batch_isend_irecv(ops):
                work.wait()
        for buffer, items in receives:
            at = 0
            for _, dest, request in items:
                n = math.prod(request.lengths) * dest.element_size()
                dest.copy_(buffer[at:at + n].view(dest.dtype).view(request.lengths))
                self._count(n)
                at += _padded(n)

    def _count(self, nbytes: int) -> None:
        self.stats.bytes_from_peers += nbytes
        self.stats.bytes_needed += nbytes

    def _box(self, request: _Request) -> torch.Tensor:
        """The requested box of a held chunk, contiguous."""
        if self.held is None:
            raise RuntimeError(f"asked for tensor {request.fqn!r} but holds no chunks")
        box = self.held.chunks[(request.fqn, request.chunk)]
        for dim, (start, length) in enumerate(zip(request.offsets, request.lengths)):
            box = box.narrow(dim, start, length)
        return box.contiguous()


def _padded(nbytes: int) -> int:
    """Each box starts 16-byte aligned in a message, so it can be viewed as any dtype."""
    return -(-nbytes // 16) * 16


def _global(rank: int, group: dist.ProcessGroup | None) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)
