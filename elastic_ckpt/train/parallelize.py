"""Which modules become FSDP2 units, and the default ``parallelize_fn``.

``parallelize_fn(model, mesh) -> nn.Module`` is the user's plug point for sharding (called on
every rank, after ``model_fn()``, before parameters are materialized); ``default_parallelize``
is what runs when none is given.
"""

from __future__ import annotations

import collections
import logging
from collections.abc import Callable, Iterable
from typing import Literal

import torch
import torch.nn as nn
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import checkpoint

log = logging.getLogger(__name__)

ParallelizeFn = Callable[[nn.Module, DeviceMesh], nn.Module]
"""``parallelize_fn(model, mesh) -> model``: shard ``model`` (``fully_shard`` per block, then
the root) over the 1-D data-parallel ``mesh``; called on every rank, once per group."""


def shard_units(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks of ``model``, anywhere in its tree, in module order: each
    becomes its own ``fully_shard`` unit. Pure (reads the tree, changes nothing).

    1. A Hugging Face model names its block classes in ``_no_split_modules``: every module of
       those classes (outermost only); when some of the classes repeat and others do not
       (BERT names ``BertEmbeddings`` beside ``BertLayer``), the repeated ones.
    2. Else the ``nn.ModuleList`` of same-class modules holding the most parameters
       (``model.model.layers``, ``transformer.h``, ``encoder.layer``, ``blocks``).
    3. Else none: only the root is sharded (one unit, the whole model gathered at once).
    """
    names = set(getattr(model, "_no_split_modules", None) or ())
    if names:
        units = _outermost(m for m in model.modules()
                           if m is not model and type(m).__name__ in names)
        counts = collections.Counter(type(u) for u in units)
        if any(n > 1 for n in counts.values()):
            units = [u for u in units if counts[type(u)] > 1]
        if units:
            return units
    best: list[nn.Module] = []
    best_params = 0
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or not len(module):
            continue
        if len({type(child) for child in module}) != 1:
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = list(module), params
    return best


def _outermost(modules: Iterable[nn.Module]) -> list[nn.Module]:
    """``modules`` without those nested inside another of them (module order kept)."""
    chosen: list[nn.Module] = []
    inner: set[int] = set()
    for module in modules:
        if id(module) in inner:
            continue
        chosen.append(module)
        inner.update(id(m) for m in module.modules() if m is not module)
    return chosen


def default_parallelize(model: nn.Module, mesh: DeviceMesh, *,
                        mixed_precision: Literal["none", "bf16"] = "none",
                        activation_checkpointing: bool = False,
                        reshard_after_forward: bool = True, compile: bool = False,
                        units: Callable[[nn.Module], list[nn.Module]] = shard_units,
                        warn: bool = True) -> nn.Module:
    """``fully_shard`` each unit of ``units(model)``, the input embedding and the output
    head (as their own units when the model exposes them HF-style, untied and outside the
    blocks; so at most about two blocks' worth of parameters is ever gathered), then the
    root, in place.

    bf16: bf16 parameters for compute, fp32 gradient reduction. Activation checkpointing
    recomputes each unit's forward in backward (an HF model uses its own
    ``gradient_checkpointing_enable``); ``compile`` compiles each unit in place, so parameter
    names, and so checkpoints, are the same with and without it. When no unit is found,
    logs a warning (``warn``) naming the model class: only the root is sharded then.
    """
    policy = MixedPrecisionPolicy()
    if mixed_precision == "bf16":
        policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks = units(model)
    if not blocks and warn:
        log.warning(
            "%s: no transformer blocks found (no _no_split_modules and no ModuleList of "
            "same-class modules), so the whole model is one FSDP unit and is all-gathered at "
            "once; pass ElasticTrainer(parallelize_fn=...) to fully_shard its blocks",
            type(model).__name__)
    if activation_checkpointing:
        _checkpoint_activations(model, blocks)
    for block in blocks:
        if compile:
            block.compile()
        fully_shard(block, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward)
    for edge in _edge_units(model, blocks):
        fully_shard(edge, mesh=mesh, mp_policy=policy,
                    reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, mp_policy=policy, reshard_after_forward=reshard_after_forward)
    return model


def _edge_units(model: nn.Module, blocks: list[nn.Module]) -> list[nn.Module]:
    """The input embedding and output head, when each can be its own unit: exposed through
    ``get_input_embeddings`` / ``get_output_embeddings``, not inside a block, and not sharing
    a parameter with the other (tied weights must live in one unit: the root keeps them)."""
    if not blocks:
        return []
    inside = {id(m) for b in blocks for m in b.modules()}
    found = []
    for getter in ("get_input_embeddings", "get_output_embeddings"):
        try:
            module = getattr(model, getter)() if hasattr(model, getter) else None
        except (NotImplementedError, AttributeError):
            module = None
        if isinstance(module, nn.Module) and module is not model and id(module) not in inside:
            found.append(module)
    if len(found) == 2:
        a, b = ({id(p) for p in m.parameters()} for m in found)
        if a & b:
            return []
    return found


def _checkpoint_activations(model: nn.Module, blocks: list[nn.Module]) -> None:
    if getattr(model, "supports_gradient_checkpointing", False) and hasattr(
            model, "gradient_checkpointing_enable"):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        return
    for block in blocks:
        # Patch the instance's forward, not the tree: module names (and so state-dict keys)
        # stay what they were, unlike wrapping each block in a new module.
        inner = block.forward

        def forward(*args, _inner=inner, **kwargs):
            return checkpoint(_inner, *args, use_reentrant=False, **kwargs)

        block.forward = forward


def model_class_name(module: nn.Module) -> str:
    """The user's class name (``fully_shard`` swaps in a generated ``FSDP<Name>`` subclass)."""
    return next(c for c in type(module).__mro__ if not issubclass(c, FSDPModule)).__name__


def fsdp_units(model: nn.Module) -> list[str]:
    """Names of the modules that are FSDP2 units (the root is ``""``), in module order."""
    return [name for name, m in model.named_modules() if isinstance(m, FSDPModule)]
