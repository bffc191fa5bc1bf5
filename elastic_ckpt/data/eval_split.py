"""Which eval samples each rank evaluates: a pure function of (samples, rank, world size).

The first ``num_samples`` dataset indices, split into contiguous per-rank slices whose sizes
differ by at most one (the first ``num_samples % world_size`` ranks get one more), each cut
into micro-batches. Every sample is evaluated exactly once at any world size.
"""

from __future__ import annotations

import math


def eval_range(num_samples: int, rank: int, world_size: int) -> range:
    """``rank``'s slice of ``range(num_samples)``; empty for ranks past ``num_samples``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is not in a group of {world_size}")
    base, extra = divmod(num_samples, world_size)
    start = rank * base + min(rank, extra)
    return range(start, start + base + (1 if rank < extra else 0))


def eval_micro_batches(num_samples: int, rank: int, world_size: int,
                       micro_batch_size: int) -> list[range]:
    """``eval_range`` cut in order into chunks of at most ``micro_batch_size``."""
    ids = eval_range(num_samples, rank, world_size)
    return [ids[i:i + micro_batch_size] for i in range(0, len(ids), micro_batch_size)]


def forward_passes(num_samples: int, world_size: int, micro_batch_size: int) -> int:
    """Forward passes every rank runs over ``num_samples`` split across ``world_size`` ranks
    in micro-batches (the most any rank needs, at least one): FSDP gathers parameters in
    each, so a rank with fewer samples runs zero-weight passes to keep up. The same count
    serves a global batch (training) and the eval set."""
    return max(1, math.ceil(math.ceil(num_samples / world_size) / micro_batch_size))
