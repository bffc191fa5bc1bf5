"""The small collectives ``CheckpointManager`` agrees with, over one process group.

Each works without a process group too (one process: its own value back), and every rank of
the group must call it, whatever it holds.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from elastic_ckpt.errors import ElasticCkptError


def group_rank(group: dist.ProcessGroup | None) -> int:
    return dist.get_rank(group) if dist.is_initialized() else 0


def group_size(group: dist.ProcessGroup | None) -> int:
    return dist.get_world_size(group) if dist.is_initialized() else 1


def sum_over_ranks(values: list[int], group: dist.ProcessGroup | None) -> list[int]:
    """The sum of ``values`` over ranks, in one small all-reduce."""
    if not dist.is_initialized() or group_size(group) == 1:
        return values
    device = "cpu"
    if "nccl" in str(dist.get_backend(group)) and torch.cuda.is_available():
        device = f"cuda:{torch.cuda.current_device()}"
    flags = torch.tensor(values, dtype=torch.int64, device=device)
    dist.all_reduce(flags, op=dist.ReduceOp.SUM, group=group)
    return [int(v) for v in flags.tolist()]


def gather_objects(value: Any, group: dist.ProcessGroup | None) -> list[Any]:
    """Every rank's ``value`` (any picklable object), by rank."""
    if not dist.is_initialized() or group_size(group) == 1:
        return [value]
    gathered: list[Any] = [None] * group_size(group)
    dist.all_gather_object(gathered, value, group=group)
    return gathered


def first_failure(failure: BaseException | None,
                  group: dist.ProcessGroup | None) -> BaseException | None:
    """The lowest rank's failure (as it raised it, rank named), or None."""
    if not dist.is_initialized() or group_size(group) == 1:
        return failure
    for rank, exc in enumerate(gather_objects(failure, group)):
        if exc is None:
            continue
        if rank == group_rank(group):
            return failure
        return from_rank(exc, rank) if isinstance(exc, ElasticCkptError) else exc
    return None


def broadcast_from_rank0(value: Any, group: dist.ProcessGroup | None) -> Any:
    """Rank 0's ``value`` (any picklable object) on every rank."""
    if not dist.is_initialized() or group_size(group) == 1:
        return value
    box = [value]
    src = dist.get_global_rank(group, 0) if group else 0
    dist.broadcast_object_list(box, src=src, group=group)
    return box[0]


def from_rank(exc: ElasticCkptError, rank: int) -> ElasticCkptError:
    """``exc`` as raised on another rank: same type and details, the rank named."""
    return type(exc)(f"rank {rank}: {exc.message}", rank=rank,
                     **{k: v for k, v in exc.details.items() if k != "rank"})
