"""``WeightSource``: the reader interface ``open_weights`` returns, and ``TensorInfo``.

Every format implements only ``_read_into`` (fill a validated destination with validated rows,
return the bytes read); argument checks, errors that name the tensor, the byte counter and
closing live here once.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import operator
import threading

import torch

from elastic_ckpt.errors import WeightsError


@dataclasses.dataclass(frozen=True)
class TensorInfo:
    """A stored tensor: global shape, stored dtype, and the URI of the file that holds it (for
    a checkpoint: its step directory, whose rank files hold the chunks)."""

    shape: tuple[int, ...]
    dtype: torch.dtype
    file: str

    @property
    def num_rows(self) -> int:
        """Rows along dim 0; a 0-dim tensor counts as one row."""
        return self.shape[0] if self.shape else 1

    @property
    def row_nbytes(self) -> int:
        return math.prod(self.shape[1:]) * self.dtype.itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    def rows_shape(self, start: int, stop: int) -> tuple[int, ...]:
        return (stop - start, *self.shape[1:]) if self.shape else ()


class WeightSource:
    """Pretrained weights opened by ``open_weights``. Not collective; reads are thread-safe.

    ``uri``: what was opened (the weights file, the index file, or the checkpoint step
    directory a root resolved to); ``format``: ``"safetensors"``, ``"torch"`` or
    ``"elastic_ckpt"``; ``bytes_read``: tensor bytes read so far (see ``read_rows``).
    """

    def __init__(self, uri: str, format: str, tensors: dict[str, TensorInfo]) -> None:
        self.uri = uri
        self.format = format
        self._tensors = tensors
        self._lock = threading.Lock()
        self._bytes_read = 0
        self._closed = False

    def __repr__(self) -> str:
        return f"<WeightSource {self.format} {self.uri} ({len(self._tensors)} tensors)>"

    def __enter__(self) -> "WeightSource":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    def tensors(self) -> dict[str, TensorInfo]:
        """Name -> ``TensorInfo`` of every tensor, in the order the file or index lists them
        (a copy)."""
        return dict(self._tensors)

    def info(self, name: str) -> TensorInfo:
        """The ``TensorInfo`` of ``name``; ``WeightsError`` naming close names if absent."""
        try:
            return self._tensors[name]
        except KeyError:
            raise _unknown_name(self.uri, name, self._tensors) from None

    def read_rows(self, name: str, start: int, stop: int, *,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows ``[start, stop)`` along dim 0 of tensor ``name``, shaped ``(stop - start,
        *shape[1:])``, in the stored dtype: a fresh contiguous CPU tensor the caller owns, or
        ``out`` (contiguous, CPU, that dtype and shape) filled in place. ``start == stop``
        gives an empty tensor (a rank whose shard has no rows). A 0-dim tensor is one row: the
        only valid range is ``start=0, stop=1``, which returns the 0-dim tensor.

        Reads only those rows: ``bytes_read`` grows by their bytes exactly for safetensors
        and torch files; for a checkpoint, by the bytes read from storage, which add at most
        the partial checksum blocks at both ends of each chunk touched (every byte read is
        verified). Raises ``WeightsError`` for an unknown name or rows out of range,
        ``WeightsCorruptError`` / ``CheckpointCorruptError`` for bad bytes.
        """
        if self._closed:
            raise WeightsError(f"{self.uri} was closed; open_weights() it again",
                               file=self.uri)
        info = self.info(name)
        start, stop = _check_rows(name, info, start, stop)
        out = _destination(name, info, start, stop, out)
        nread = self._read_into(name, info, start, stop, out)
        with self._lock:
            self._bytes_read += nread
        return out

    def read(self, name: str) -> torch.Tensor:
        """The whole tensor (for small replicated state such as buffers)."""
        return self.read_rows(name, 0, self.info(name).num_rows)

    def close(self) -> None:
        """Release files (and any local temporary copy). Idempotent."""
        if not self._closed:
            self._closed = True
            self._close()

    # -- per format ------------------------------------------------------------------------
    def _read_into(self, name: str, info: TensorInfo, start: int, stop: int,
                   out: torch.Tensor) -> int:
        """Fill ``out`` with the (validated) rows; return the bytes read."""
        raise NotImplementedError

    def _close(self) -> None:
        pass


# -- argument checks -------------------------------------------------------------------------
def _check_rows(name: str, info: TensorInfo, start, stop) -> tuple[int, int]:
    try:
        start, stop = operator.index(start), operator.index(stop)
    except TypeError:
        raise TypeError(f"read_rows({name!r}): start and stop must be ints, got "
                        f"{start!r}, {stop!r}") from None
    if not info.shape:
        if (start, stop) != (0, 1):
            raise WeightsError(f"tensor {name!r} of {info.file} is 0-dim: its only row range is "
                               f"start=0, stop=1, not [{start}, {stop})", tensor=name,
                               file=info.file)
    elif not 0 <= start <= stop <= info.shape[0]:
        raise WeightsError(
            f"rows [{start}, {stop}) are out of range for tensor {name!r} of {info.file} "
            f"(shape {list(info.shape)}): valid is 0 <= start <= stop <= {info.shape[0]}",
            tensor=name, file=info.file)
    return start, stop


def _destination(name: str, info: TensorInfo, start: int, stop: int,
                 out: torch.Tensor | None) -> torch.Tensor:
    shape = info.rows_shape(start, stop)
    if out is None:
        return torch.empty(shape, dtype=info.dtype)
    if not (out.device.type == "cpu" and out.is_contiguous() and out.dtype == info.dtype
            and tuple(out.shape) == shape):
        raise ValueError(f"read_rows({name!r}, out=...) needs a contiguous CPU tensor of "
                         f"dtype {info.dtype} and shape {list(shape)}, got "
                         f"{out.dtype}{list(out.shape)} on {out.device}"
                         f"{'' if out.is_contiguous() else ' (not contiguous)'}")
    return out


def _unknown_name(uri: str, name: str, tensors: dict[str, TensorInfo]) -> WeightsError:
    close = difflib.get_close_matches(name, tensors, n=3, cutoff=0.6)
    # Names that differ by a leading prefix ("model.layers.0..." vs "layers.0...").
    close += [k for k in tensors if (k.endswith("." + name) or name.endswith("." + k))
              and k not in close][:3]
    hint = (f"close names: {', '.join(close)}" if close else
            f"it has {len(tensors)} tensors, e.g. {', '.join(list(tensors)[:3]) or '(none)'}")
    return WeightsError(f"{uri} has no tensor {name!r}; {hint}", tensor=name, file=uri)
