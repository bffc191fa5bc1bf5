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


def collate_lm(samples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Stack a list of same-keyed sample dicts into one batch dict.

    Tensors and numpy arrays are stacked along a new dim 0 (so they must share shape and
    dtype); Python ints/floats/bools become a 1-D tensor; anything else becomes a list.
    Raises ``DatasetError`` naming the key and sample on mismatch, or for an empty list (a
    rank with no samples has no micro-batches to collate).
    """
    if not samples:
        raise DatasetError("collate_lm got no samples; a rank with an empty share has none")
    keys = list(samples[0].keys())
    batch: dict[str, Any] = {}
    for n, sample in enumerate(samples):
        if not isinstance(sample, dict) or list(sample.keys()) != keys:
            got = list(sample.keys()) if isinstance(sample, dict) else type(sample).__name__
            raise DatasetError(f"collate_lm: sample {n} has keys {got}, sample 0 has {keys}")
    for key in keys:
        values = [s[key] for s in samples]
        first = values[0]
        if isinstance(first, (torch.Tensor, np.ndarray)):
            tensors = [torch.as_tensor(v) for v in values]
            for n, t in enumerate(tensors):
                if t.shape != tensors[0].shape or t.dtype != tensors[0].dtype:
                    raise DatasetError(
                        f"collate_lm: {key!r} of sample {n} has shape {tuple(t.shape)} "
                        f"{t.dtype}, sample 0 has {tuple(tensors[0].shape)} "
                        f"{tensors[0].dtype}; pad or set seq_len so samples match"
                    )
            batch[key] = torch.stack(tensors)
        elif isinstance(first, (bool, int, float)) and all(
            type(v) is type(first) for v in values
        ):
            batch[key] = torch.tensor(values)
        else:
            batch[key] = values
    return batch
