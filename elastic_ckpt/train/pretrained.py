"""Start from pretrained weights (``checkpoint.init_from``): each rank reads only the rows of
its own shards, straight into the sharded (possibly meta-built) model.

Key names must match ``model.state_dict()`` once ``init_key_prefix`` is stripped. Tied
parameters (one tensor under several names, as HF's ``lm_head.weight`` and
``embed_tokens.weight``) are satisfied by any one of their names. Everything is checked before
a byte of tensor data is read: missing or unexpected keys and shape mismatches raise
``ConfigError`` naming the first few keys, both shapes and the file.
"""

from __future__ import annotations

import dataclasses
import re
import time

import torch
import torch.nn as nn
from torch.distributed.tensor import DTensor
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from elastic_ckpt.errors import ConfigError
from elastic_ckpt.train.parallelize import model_class_name

_SHOW = 5  # keys named in an error


@dataclasses.dataclass(frozen=True)
class PretrainedReport:
    uri: str
    tensors: int
    """Distinct tensors loaded."""
    bytes_read: int
    """Bytes this rank read from the weights (about 1/W of the model, plus what is
    replicated)."""
    model_bytes: int
    """Bytes of the full model's tensors (for comparison)."""
    seconds: float


def load_pretrained(model: nn.Module, uri: str, prefix: str = "") -> PretrainedReport:
    """Copy the weights at ``uri`` into ``model`` (sharded or not), each rank reading only its
    own rows. Not collective. Raises ``ConfigError`` (field ``checkpoint.init_from``) for
    a mismatch, before anything is loaded."""
    from elastic_ckpt.checkpoint.weights import open_weights

    t0 = time.perf_counter()
    with open_weights(uri) as source:
        plan = _plan(model, source, prefix)
        with torch.no_grad():
            for key, target in plan:
                _load_one(source, key, target)
        read = source.bytes_read
    full = sum(t.numel() * t.element_size() for _, t in plan)
    return PretrainedReport(uri=source.uri, tensors=len(plan), bytes_read=read,
                            model_bytes=full, seconds=time.perf_counter() - t0)


def _plan(model: nn.Module, source, prefix: str) -> list[tuple[str, torch.Tensor]]:
    """``[(source key, target tensor)]``, one per distinct tensor of ``model.state_dict()``."""
    infos = source.tensors()
    available = {name[len(prefix):]: name for name in infos if name.startswith(prefix)}
    state = model.state_dict(keep_vars=True)
    groups: dict[int, list[str]] = {}
    targets: dict[int, torch.Tensor] = {}
    for name, tensor in state.items():
        groups.setdefault(id(tensor), []).append(name)
        targets[id(tensor)] = tensor
    ignorable = _ignorable(model, state)
    may_miss = [re.compile(p) for p in
                getattr(model, "_keys_to_ignore_on_load_missing", None) or ()]
    plan, missing, mismatched, used = [], [], [], set()
    for tid, names in groups.items():
        found = next((n for n in names if n in available), None)
        if found is None:
            if not any(p.search(n) for p in may_miss for n in names):
                missing.append(" = ".join(names))
            continue
        used.update(n for n in names if n in available)
        key, target = available[found], targets[tid]
        have = tuple(infos[key].shape)
        if have != tuple(target.shape):
            mismatched.append(f"{found}: file {have} vs model {tuple(target.shape)}")
        plan.append((key, target))
    unexpected = [available[n] for n in available if n not in used
                  and not any(p.search(n) for p in ignorable)]
    where = f"checkpoint.init_from {source.uri}"
    if missing or unexpected or mismatched:
        problems = []
        if mismatched:
            problems.append(f"{len(mismatched)} shape mismatches: " + "; ".join(
                mismatched[:_SHOW]))
        if missing:
            problems.append(f"{len(missing)} model keys missing from the file: "
                            + ", ".join(missing[:_SHOW]))
        if unexpected:
            problems.append(f"{len(unexpected)} keys in the file the model does not have: "
                            + ", ".join(unexpected[:_SHOW]))
        if prefix and not available:
            hint = (f"; no key in the file starts with init_key_prefix {prefix!r} (the first "
                    f"keys are {', '.join(list(infos)[:3])})")
        elif not prefix and unexpected:
            hint = "; if the file's keys carry a prefix, set checkpoint.init_key_prefix"
        else:
            hint = ""
        raise ConfigError(f"{where} does not match the model {model_class_name(model)}: "
                          + ". ".join(problems) + hint, field="checkpoint.init_from")
    return plan


def _ignorable(model: nn.Module, state: dict[str, torch.Tensor]) -> list[re.Pattern]:
    """Source keys to skip: HF's ``_keys_to_ignore_on_load_unexpected`` and non-persistent
    buffers (not in ``state``, the model's state dict; older HF files carry e.g. rotary
    ``inv_freq``, which the model computes)."""
    patterns = [re.compile(p) for p in
                getattr(model, "_keys_to_ignore_on_load_unexpected", None) or ()]
    for name, _ in model.named_buffers():
        if name not in state:
            patterns.append(re.compile("^" + re.escape(name) + "$"))
    return patterns


def _load_one(source, key: str, target: torch.Tensor) -> None:
    """Read the rows of ``key`` that this rank's piece of ``target`` covers; copy them in."""
    if isinstance(target, DTensor):
        local = target.to_local()
        shape, offset = compute_local_shape_and_global_offset(
            target.shape, target.device_mesh, target.placements)
        if local.numel() == 0:
            return
    else:
        local, shape, offset = target.data, tuple(target.shape), (0,) * target.dim()
    if target.dim() == 0:
        local.copy_(source.read(key))
        return
    rows = source.read_rows(key, offset[0], offset[0] + shape[0])
    for dim in range(1, target.dim()):
        rows = rows.narrow(dim, offset[dim], shape[dim])
    local.copy_(rows)
