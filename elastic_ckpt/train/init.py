"""Materialize a model built on the meta device, with the same weights at every world size.

A meta model sharded by ``fully_shard`` has DTensor parameters whose local shards are all
that a rank should ever allocate for good. Initializing those shards directly (``normal_``
on each rank's piece) draws the same numbers on every rank for a different piece of the
tensor, so the weights depend on the world size. Here each FSDP unit in turn gets full-size
temporaries, is initialized by the model's own init code from a generator seeded by
(seed, the unit's name), and each rank keeps its shard: bit-identical weights at any W, and at
most one unit is ever full-size on a rank.

The init code, per module, from the closest that exists: ``_init_weights(module)`` of the
nearest ancestor defining it (the Hugging Face convention, which also recomputes buffers such
as rotary frequencies), else ``module.reset_parameters()``. A floating-point parameter or
buffer left unwritten is an error naming it (it would otherwise train on garbage).
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from elastic_ckpt.errors import ConfigError
from elastic_ckpt.train.parallelize import model_class_name


def has_meta_state(model: nn.Module) -> bool:
    return any(t.is_meta for t in (*model.parameters(), *model.buffers()))


@torch.no_grad()
def materialize(model: nn.Module, device: torch.device, seed: int) -> None:
    """Allocate and initialize every meta parameter and buffer of ``model`` (sharded or not)
    on ``device``. Not collective (every rank computes the same full values and keeps its own
    piece). A model without meta state is left as it is."""
    if not has_meta_state(model):
        return
    units = [(name, m) for name, m in model.named_modules() if isinstance(m, FSDPModule)]
    if not units or units[0][1] is not model:
        units.insert(0, ("", model))
    owner = _owners(model, [m for _, m in units])
    inits = _init_fns(model)
    for name, unit in units:
        modules = [m for m in _post_order(unit) if owner[id(m)] is unit]
        _init_group(name, modules, inits, device, seed)


def _owners(model: nn.Module, units: list[nn.Module]) -> dict[int, nn.Module]:
    """module id -> the innermost unit containing it."""
    owner: dict[int, nn.Module] = {}
    for unit in units:  # outer units come first in module order; inner ones overwrite
        for m in unit.modules():
            owner[id(m)] = unit
    return owner


def _post_order(module: nn.Module) -> Iterator[nn.Module]:
    """Children before parents, as ``nn.Module.apply`` (and HF's init) visits them: a
    parent's init may override what it set on a child."""
    for child in module.children():
        yield from _post_order(child)
    yield module


def _init_fns(model: nn.Module) -> dict[int, object]:
    """module id -> ``_init_weights`` of its innermost ancestor-or-self defining one."""
    out: dict[int, object] = {}

    def walk(module: nn.Module, current) -> None:
        if hasattr(module, "_init_weights"):
            current = module._init_weights
        out[id(module)] = current
        for child in module.children():
            walk(child, current)

    walk(model, None)
    return out


def _init_group(name: str, modules: list[nn.Module], inits: dict[int, object],
                device: torch.device, seed: int) -> None:
    # Full-size stand-ins for every meta tensor of the group, one per distinct tensor (tied
    # parameters share one).
    full: dict[int, torch.Tensor] = {}
    slots: list[tuple[nn.Module, str, bool, torch.Tensor]] = []  # module, name, is_param, orig
    for module in modules:
        for kind, tensors in (("param", module._parameters), ("buffer", module._buffers)):
            for attr, t in list(tensors.items()):
                if t is None or not t.is_meta:
                    continue
                if id(t) not in full:  # a DTensor's shape is the global one
                    full[id(t)] = _nan_like(t.shape, t.dtype, device)
                slots.append((module, attr, kind == "param", t))
    if not slots:
        return
    params: dict[int, nn.Parameter] = {}  # tied slots get one Parameter, as they had
    for module, attr, is_param, orig in slots:
        if is_param:
            module._parameters[attr] = params.setdefault(id(orig), nn.Parameter(
                full[id(orig)], requires_grad=orig.requires_grad))
        else:
            module._buffers[attr] = full[id(orig)]
    with _seeded(seed, name, device):
        for module in modules:
            init = inits.get(id(module))
            if init is not None:
                init(module)
            elif hasattr(module, "reset_parameters"):
                module.reset_parameters()
    done: dict[int, torch.Tensor] = {}  # one sharded tensor per distinct original
    for module, attr, is_param, orig in slots:
        if id(orig) not in done:
            value = module._parameters[attr] if is_param else module._buffers[attr]
            _check_written(name, module, attr, value)
            done[id(orig)] = _shard_into(orig, value.detach())
        (module._parameters if is_param else module._buffers)[attr] = done[id(orig)]


def _nan_like(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.is_floating_point():
        out.fill_(float("nan"))
    return out


@contextlib.contextmanager
def _seeded(seed: int, name: str, device: torch.device) -> Iterator[None]:
    """Seed the generators init code draws from, by (seed, unit name): a unit's weights do not
    depend on the world size, on other units, or on the order units are initialized in."""
    unit_seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(unit_seed)
        yield


def _check_written(unit: str, module: nn.Module, attr: str, value: torch.Tensor) -> None:
    if value.is_floating_point() and torch.isnan(value).any():
        raise ConfigError(
            f"{model_class_name(module)}.{attr} (in FSDP unit {unit or '<root>'!r}) was built on "
            "the meta device and no init code wrote it: give the module reset_parameters() "
            "(or the model an HF-style _init_weights(module)), or build the model off meta",
            field="model_fn")


def _shard_into(orig: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """The rank's piece of the full ``value`` laid out like ``orig`` (a DTensor keeps its
    mesh and placements; a plain tensor stays the full value)."""
    if isinstance(orig, DTensor):
        # Every rank holds the same full value: each keeps its own piece, no communication.
        value = distribute_tensor(value, orig.device_mesh, orig.placements, src_data_rank=None)
    if isinstance(orig, nn.Parameter):
        return nn.Parameter(value, requires_grad=orig.requires_grad)
    return value
