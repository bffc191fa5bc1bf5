"""Process group, device mesh and FSDP2 sharding for one rank."""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
from typing import Callable, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard


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
    try:
        yield
    finally:
        dist.destroy_process_group()


def device_mesh(device: torch.device) -> DeviceMesh:
    """A 1-D mesh over the default process group (FSDP2's data-parallel axis)."""
    return init_device_mesh(device.type, (dist.get_world_size(),), mesh_dim_names=("dp",))


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The modules that become their own ``fully_shard`` unit: every child of the first
    ``ModuleList`` attribute named ``blocks``/``layers``/``h``, else none (root only)."""
    for name in ("blocks", "layers", "h"):
        units = getattr(model, name, None)
        if isinstance(units, nn.ModuleList):
            return list(units)
    return []


def apply_fsdp(model: nn.Module, mesh: DeviceMesh, mixed_precision: str = "none",
               units: Callable[[nn.Module], list[nn.Module]] = shard_units) -> nn.Module:
    """``fully_shard`` each unit and the root. bf16: bf16 params for compute, fp32 reduce."""
    policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    for unit in units(model):
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    return model


def materialize(model: nn.Module, device: torch.device) -> None:
    """Allocate and initialize parameters of a model built on the meta device (after sharding,
    so each rank allocates only its shard). Uses ``init_weights()`` when the model has one,
    else each submodule's ``reset_parameters()``."""
    if not any(p.is_meta for p in model.parameters()):
        return
    model.to_empty(device=device)
    with torch.no_grad():
        if hasattr(model, "init_weights"):
            model.init_weights()
        else:
            for module in model.modules():
                if hasattr(module, "reset_parameters"):
                    module.reset_parameters()
