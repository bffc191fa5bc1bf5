"""Process group and device mesh for one rank."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from typing import Iterator

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh


@dataclasses.dataclass(frozen=True)
class RankSpec:
    """Where one rank sits in a worker group (everything it needs to rendezvous)."""

    rank: int
    world_size: int
    master_addr: str
    master_port: int
    use_gpu: bool = False
    local_device: int = 0
    timeout_s: float = 600.0
    node: str = ""
    """The node this rank runs on (Ray node id; empty: this machine)."""

    @property
    def backend(self) -> str:
        return "nccl" if self.use_gpu else "gloo"

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.local_device) if self.use_gpu else torch.device("cpu")


@contextlib.contextmanager
def process_group(spec: RankSpec) -> Iterator[None]:
    """Initialize the default process group for ``spec`` (TCP rendezvous at rank 0's address)
    and destroy it on exit, whatever happens."""
    if spec.use_gpu:
        torch.cuda.set_device(spec.local_device)
    dist.init_process_group(
        spec.backend,
        init_method=f"tcp://{spec.master_addr}:{spec.master_port}",
        rank=spec.rank,
        world_size=spec.world_size,
        timeout=datetime.timedelta(seconds=spec.timeout_s),
        device_id=spec.device if spec.use_gpu else None,
    )
    forget_earlier_groups()
    try:
        yield
    finally:
        dist.destroy_process_group()


def forget_earlier_groups() -> None:
    """Drop what DTensor cached in this thread about the meshes of earlier process groups.

    DTensor's sharding propagation caches output specs by input spec, and a mesh compares
    equal to any mesh over the same global ranks: a mesh of an earlier group of the same size
    hits the cache. The spec it returns carries the earlier mesh, whose coordinate is this
    process's rank in that group; a process that trains on at another rank of a group of the
    same size (a kept worker after a resize) then computed its shards' offsets at its old rank
    and loaded another rank's rows (found by ``tests/test_memory_tier.py``). Called after every
    ``init_process_group`` in a process that may have had a group before."""
    try:
        from torch.distributed.tensor.debug import _clear_sharding_prop_cache
    except ImportError:  # an older torch: the Python cache only
        from torch.distributed.tensor import DTensor

        DTensor._op_dispatcher.sharding_propagator.propagate_op_sharding.cache_clear()
        return
    _clear_sharding_prop_cache()


def device_mesh(device: torch.device) -> DeviceMesh:
    """A 1-D mesh over the default process group (FSDP2's data-parallel axis)."""
    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))
