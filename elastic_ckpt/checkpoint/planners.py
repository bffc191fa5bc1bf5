"""DCP planners that keep non-tensor state as JSON (never pickle) and check shapes up front.

DCP's default planners ``torch.save`` every non-tensor leaf and ``torch.load(weights_only=False)``
it back, so a downloaded checkpoint could run code on load. These subclasses only change that
serialization and add a clear shape/dtype check; the resharding arithmetic stays DCP's.
"""

from __future__ import annotations

import io
from typing import Any, Mapping

import torch
from torch.distributed.checkpoint import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint._traverse import set_element  # DCP's own helper
from torch.distributed.checkpoint.metadata import TensorStorageMetadata
from torch.distributed.checkpoint.planner import (
    LoadPlan,
    ReadItem,
    SavePlan,
    WriteItem,
    WriteItemType,
)
from torch.distributed.tensor import DTensor

from elastic_ckpt.checkpoint.manifest import dumps_value, loads_value
from elastic_ckpt.errors import CheckpointMismatchError


class JsonSavePlanner(DefaultSavePlanner):
    """Default save planning; non-tensor leaves are serialized as tagged JSON. A leaf that is
    not JSON-able raises ``NotCheckpointableError`` while planning, before any rank writes."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True,
                         dedup_save_to_lowest_rank=False)

    def create_local_plan(self) -> SavePlan:
        check_json_leaves(self.state_dict)
        return super().create_local_plan()

    def transform_object(self, write_item: WriteItem, object: Any):
        if write_item.type == WriteItemType.BYTE_IO:
            return io.BytesIO(dumps_value(object, write_item.index.fqn))
        return object


class JsonLoadPlanner(DefaultLoadPlanner):
    """Default load planning; non-tensor leaves are decoded from JSON; every tensor's global
    shape is checked against the checkpoint before any byte is read."""

    def __init__(self) -> None:
        super().__init__(flatten_state_dict=True, flatten_sharded_tensors=True,
                         allow_partial_load=False)

    def create_local_plan(self) -> LoadPlan:
        for fqn, value in self.state_dict.items():
            md = self.metadata.state_dict_metadata.get(fqn)
            if not isinstance(value, torch.Tensor) or md is None:
                continue  # missing keys are reported by DCP's own check below
            if not isinstance(md, TensorStorageMetadata):
                raise CheckpointMismatchError(
                    f"tensor {fqn!r}: the checkpoint holds a non-tensor value under this key",
                    tensor=fqn)
            shape = tuple(value.shape)
            if shape != tuple(md.size):
                raise CheckpointMismatchError(
                    f"tensor {fqn!r}: model has global shape {shape} but the checkpoint holds "
                    f"{tuple(md.size)}; the model config differs from the one that saved it",
                    tensor=fqn)
        try:
            return super().create_local_plan()
        except RuntimeError as exc:
            if "Missing key" in str(exc):
                raise CheckpointMismatchError(
                    f"{exc}; the state being loaded has entries the checkpoint lacks",
                ) from None
            raise

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        decoded = loads_value(value.getvalue())
        fqn = read_item.dest_index.fqn
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], decoded)
        else:
            self.state_dict[fqn] = decoded


def is_tensor_like(value: Any) -> bool:
    """Whether DCP saves ``value`` as tensor chunks (a tensor, DTensor, ShardedTensor or other
    ``_Checkpointable``) rather than as one opaque object (``BYTE_IO``)."""
    return isinstance(value, torch.Tensor) or hasattr(value, "__create_write_items__")


def check_json_leaves(state: Mapping[Any, Any]) -> None:
    """Raise ``NotCheckpointableError`` naming the first non-tensor leaf of the flat
    ``state`` that cannot be stored as JSON."""
    for key, value in state.items():
        if not is_tensor_like(value):
            dumps_value(value, str(key))


def placements_of(value: Any) -> tuple[tuple[str, ...] | None, tuple[int, ...] | None,
                                        tuple[str, ...] | None]:
    """``(placements, mesh shape, mesh axis names)`` of a DTensor; all None otherwise."""
    if isinstance(value, DTensor):
        mesh = value.device_mesh
        return (tuple(repr(p) for p in value.placements), tuple(mesh.shape),
                tuple(mesh.mesh_dim_names) if mesh.mesh_dim_names else None)
    return None, None, None
