"""One micro-batch, from sample ids to tensors on the rank's device: shared by the step loop
and eval."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from elastic_ckpt.data import fetch


def load_batch(dataset: Any, ids: Sequence[int], collate_fn: Callable[[list], Any],
               device: torch.device) -> Any:
    """The samples ``ids`` of ``dataset``, collated and moved to ``device``."""
    return to_device(collate_fn(fetch(dataset, ids)), device)


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it (nested in dicts, lists, tuples) on ``device``."""
    if device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(to_device(v, device) for v in batch)
    return batch


def count_tokens(batch: Any) -> int:
    """Tokens of a language-modelling batch (its ``input_ids``); 0 for any other batch."""
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"].numel()
    return 0
