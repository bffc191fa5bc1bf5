"""The map-style dataset contract, batched fetching and the default collate.

A dataset is anything with ``__len__`` and ``__getitem__(i)`` (``MapDataset``); it may add
``__getitems__(ids)`` to serve a whole micro-batch at once (same name and contract torch's
``DataLoader`` uses). Any rank may be asked for any index: datasets keep no per-rank state.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch
from torch.utils.data import default_collate

from elastic_ckpt.errors import ElasticCkptError


class DatasetError(ElasticCkptError, ValueError):
    """A dataset's contents do not fit what was asked of them (wrong row length, null row,
    samples that cannot be collated); the message names the file, row and column."""


@runtime_checkable
class MapDataset(Protocol):
    """Random access to ``len(self)`` samples by index ``0 <= i < len(self)``.

    Implementations may also define ``__getitems__(ids: list[int]) -> list`` returning
    ``[self[i] for i in ids]`` faster; it is optional, so it is not part of the
    ``isinstance`` check.
    """

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Any: ...


def fetch(dataset: MapDataset, ids: Sequence[int] | np.ndarray) -> list:
    """The samples at ``ids``, in order: ``dataset.__getitems__`` when defined, else one
    ``__getitem__`` per id. Ids are passed as Python ints."""
    index = [int(i) for i in ids]
    getitems = getattr(dataset, "__getitems__", None)
    if getitems is None:
        return [dataset[i] for i in index]
    samples = list(getitems(index))
    if len(samples) != len(index):
        raise DatasetError(
            f"{type(dataset).__name__}.__getitems__ returned {len(samples)} samples "
            f"for {len(index)} ids"
        )
    return samples


def collate(samples: Sequence[Any]) -> Any:
    """The default collate: ``torch.utils.data.default_collate`` (tensors, numpy arrays and
    numbers stacked; tuples, lists and dicts collated field by field), with errors that say
    which samples would not stack. Raises ``DatasetError`` for an empty list (a rank with an
    empty share has no micro-batches to collate)."""
    if not samples:
        raise DatasetError("collate got no samples; a rank with an empty share has none")
    try:
        return default_collate(list(samples))
    except (RuntimeError, TypeError, ValueError) as exc:
        raise DatasetError(
            f"cannot collate {len(samples)} samples (first: {_describe(samples[0])}): {exc}. "
            "Samples must have the same structure and tensor shapes (pad, or set seq_len), "
            "or pass ElasticTrainer(collate_fn=...)") from None


def _describe(sample: Any) -> str:
    if isinstance(sample, (torch.Tensor, np.ndarray)):
        return f"{type(sample).__name__} {tuple(sample.shape)} {sample.dtype}"
    if isinstance(sample, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in sample.items()) + "}"
    if isinstance(sample, (tuple, list)):
        return type(sample).__name__ + "(" + ", ".join(_describe(v) for v in sample) + ")"
    return type(sample).__name__
