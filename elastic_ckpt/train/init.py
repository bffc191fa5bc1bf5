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
as rotary frequencies), else (or where that leaves a module's own tensor untouched)
``module.reset_parameters()``. A meta parameter or buffer no init code writes is an error
naming it (it would otherwise train on garbage); real tensors beside meta ones keep their
values. Init code sees only its own unit's tensors full-size: a parent writing a child that is
another FSDP unit writes nothing there (that unit is initialized on its own).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import zlib
from collections.abc import Iterator

import torch
import torch.nn as nn
from torch.distributed.fsdp import FSDPModule
from torch.distributed.tensor import DTensor, distribute_tensor

from elastic_ckpt.errors import ConfigError
from elastic_ckpt.train.parallelize import model_class_name

log = logging.getLogger(__name__)


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
    _warn_whole_model_init(model)
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
            _check_signature(module)
        out[id(module)] = current
        for child in module.children():
            walk(child, current)

    walk(model, None)
    return out


def _check_signature(module: nn.Module) -> None:
    try:
        params = inspect.signature(module._init_weights).parameters
    except (TypeError, ValueError):
        return
    if not params:
        raise ConfigError(
            f"{model_class_name(module)}._init_weights() takes no argument; for a model built "
            "on the meta device elastic_ckpt calls _init_weights(module) once per submodule "
            "(the Hugging Face convention), so it must initialize just that module's own "
            "parameters and buffers", field="model_fn")


def _warn_whole_model_init(model: nn.Module) -> None:
    if hasattr(model, "init_weights") and not hasattr(model, "_init_weights"):
        log.warning(
            "%s defines init_weights(), a whole-model init that elastic_ckpt does not call on a "
            "meta-device model (on sharded parameters it would draw different numbers at each "
            "world size); each module's reset_parameters() is used instead. Define "
            "_init_weights(module) to initialize one module at a time.", model_class_name(model))


def _init_group(name: str, modules: list[nn.Module], inits: dict[int, object],
                device: torch.device, seed: int) -> None:
    # Full-size stand-ins for every meta tensor of the group, one per distinct tensor (tied
    # parameters share one).
    full: dict[int, torch.Tensor] = {}
    slots: list[tuple[nn.Module, str, bool, torch.Tensor]] = []  # module, name, is_param, orig
    real: list[tuple[torch.Tensor, torch.Tensor]] = []  # (tensor, its value) to keep as is
    for module in modules:
        for kind, tensors in (("param", module._parameters), ("buffer", module._buffers)):
            for attr, t in list(tensors.items()):
                if t is None:
                    continue
                if not t.is_meta:
                    real.append((t, t.detach().clone()))
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
    stand_ins = [_slot(module, attr, is_param) for module, attr, is_param, _ in slots]
    before = {id(t): t._version for t in stand_ins}
    with _seeded(seed, name, device):
        for module in modules:
            init = inits.get(id(module))
            if init is not None:
                init(module)
            if (init is None or _unwritten(module, slots, before)) and hasattr(
                    module, "reset_parameters"):
                module.reset_parameters()
    # Init code runs per module, and may touch a real tensor beside the meta ones (a model
    # built partly on meta): those keep the values they had.
    for tensor, value in real:
        tensor.detach().copy_(value)
    done: dict[int, torch.Tensor] = {}  # one sharded tensor per distinct original
    for module, attr, is_param, orig in slots:
        if id(orig) not in done:
            value = _slot(module, attr, is_param)
            _check_written(name, module, attr, value, before)
            done[id(orig)] = _shard_into(orig, value.detach())
        (module._parameters if is_param else module._buffers)[attr] = done[id(orig)]


def _slot(module: nn.Module, attr: str, is_param: bool) -> torch.Tensor:
    return module._parameters[attr] if is_param else module._buffers[attr]


def _untouched(value: torch.Tensor, before: dict[int, int]) -> bool:
    """Still the stand-in it was before init, never written in place (``_version`` counts
    in-place writes; init code that assigns a new tensor replaces the object)."""
    return id(value) in before and value._version == before[id(value)]


def _unwritten(module: nn.Module, slots, before: dict[int, int]) -> bool:
    """Whether init code left one of ``module``'s own stand-ins untouched."""
    return any(m is module and _untouched(_slot(m, attr, is_param), before)
               for m, attr, is_param, _ in slots)


def _nan_like(shape: torch.Size, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    out = torch.empty(shape, dtype=dtype, device=device)
    if out.is_floating_point():
        out.fill_(float("nan"))
    return out


@contextlib.contextmanager
def _seeded(seed: int, name: str, device: torch.device) -> Iterator[None]:
    """Seed the generators init code draws from, by (seed, unit name): a unit's weights do not
    depend on the world size, on other units, or on the order units are initialized in.
    Only this rank's generators are touched, and restored afterwards."""
    unit_seed = (seed * 1_000_003 + zlib.crc32(name.encode())) % (2**63)
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.default_generator.manual_seed(unit_seed)
        if device.type == "cuda":
            with torch.cuda.device(device):
                torch.cuda.manual_seed(unit_seed)
        yield


def _check_written(unit: str, module: nn.Module, attr: str, value: torch.Tensor,
                   before: dict[int, int]) -> None:
    untouched = _untouched(value, before)
    partial = value.is_floating_point() and bool(torch.isnan(value).any())
    if untouched or partial:
        what = "no init code wrote it" if untouched else "init code left part of it unwritten"
        raise ConfigError(
            f"{model_class_name(module)}.{attr} (in FSDP unit {unit or '<root>'!r}) was built "
            f"on the meta device and {what}: give the module reset_parameters() (or the model "
            "an HF-style _init_weights(module)) that sets it, or build the model off meta",
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
