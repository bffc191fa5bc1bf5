"""Single weight files: safetensors (parsed over ranged reads) and ``torch.save`` files
(memory-mapped). ``open_weights`` picks one by the file's suffix."""

from __future__ import annotations

import logging
import os
import tempfile
import weakref
from contextlib import ExitStack

import torch

from elastic_ckpt.checkpoint.safetensors_format import read_header
from elastic_ckpt.checkpoint.weight_source import TensorInfo, WeightSource
from elastic_ckpt.errors import StorageError, WeightsCorruptError, WeightsError
from elastic_ckpt.storage import Storage

log = logging.getLogger(__name__)

_COPY_PIECE = 16 << 20
"""Buffer size for copying a non-local torch file to a local temporary file."""


# -- safetensors -----------------------------------------------------------------------------
class SafetensorsFile(WeightSource):
    """One safetensors file, held open: reads are positional, so threads can share it.
    ``metadata``: the header's ``__metadata__`` (``{}`` if none)."""

    def __init__(self, file: Storage) -> None:
        size = file.size("")
        if size is None:
            raise WeightsError(f"{file.uri} does not exist", path=file.uri)
        stack = ExitStack()
        try:
            self._reader = stack.enter_context(file.open_read(""))
            entries, self.metadata = read_header(self._reader, size, file.uri)
        except BaseException:
            stack.close()
            raise
        self._stack, self._entries = stack, entries
        super().__init__(file.uri, "safetensors", {
            name: TensorInfo(e.shape, e.dtype, file.uri) for name, e in entries.items()})

    def _read_into(self, name, info, start, stop, out) -> int:
        # Rows are contiguous in row-major order: one ranged read straight into ``out``.
        offset = self._entries[name].start + start * info.row_nbytes
        buf = out.reshape(-1).view(torch.uint8).numpy()
        if not len(buf):
            return 0
        try:
            n = self._reader.read_into(offset, buf)
        except OSError as exc:
            raise StorageError(f"cannot read {self.uri} (tensor {name!r}): {exc}",
                               path=self.uri) from exc
        if n != len(buf):
            raise WeightsCorruptError(
                f"{self.uri} ended at byte {offset + n} while reading tensor {name!r} (bytes "
                f"[{offset}, {offset + len(buf)})): it was truncated after it was opened",
                file=self.uri, tensor=name)
        return n

    def _close(self) -> None:
        self._stack.close()


# -- torch files -----------------------------------------------------------------------------
class TorchFile(WeightSource):
    """A ``torch.save``d flat dict of tensors, memory-mapped: a read touches only its rows'
    pages. Files saved in the legacy (non-zip) format cannot be mapped and are loaded whole."""

    def __init__(self, file: Storage) -> None:
        path, temporary = _local_path(file)
        self._cleanup = weakref.finalize(self, _remove_quietly, path) if temporary else None
        try:
            self._state = _load_flat_state_dict(path, file.uri)
        except BaseException:
            self._close()
            raise
        super().__init__(file.uri, "torch", {
            name: TensorInfo(tuple(t.shape), t.dtype, file.uri) for name, t in self._state.items()})

    def _read_into(self, name, info, start, stop, out) -> int:
        tensor = self._state[name]
        out.copy_(tensor[start:stop] if tensor.dim() else tensor)
        return out.numel() * info.dtype.itemsize

    def _close(self) -> None:
        self._state = {}
        if self._cleanup is not None:
            self._cleanup()


def _local_path(file: Storage) -> tuple[str, bool]:
    """``(local path, is a temporary copy)``: ``torch.load(mmap=True)`` needs a local file."""
    if file.is_local:
        return file.path(), False
    suffix = os.path.splitext(file.path())[1]
    fd, tmp = tempfile.mkstemp(prefix="elastic-ckpt-weights-", suffix=suffix)
    log.info("copying %s to the local temporary file %s (torch files are read locally)",
             file.uri, tmp)
    try:
        with os.fdopen(fd, "wb") as out, file.open_read("") as src:
            piece, offset = bytearray(_COPY_PIECE), 0
            while n := src.read_into(offset, piece):
                out.write(memoryview(piece)[:n])
                offset += n
    except BaseException as exc:
        _remove_quietly(tmp)
        if isinstance(exc, OSError) and not isinstance(exc, StorageError):
            raise StorageError(f"cannot copy {file.uri} to {tmp}: {exc}", path=file.uri) from exc
        raise
    return tmp, True


def _load_flat_state_dict(path: str, where: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, weights_only=True, mmap=True, map_location="cpu")
    except RuntimeError as exc:
        if "mmap can only be used" not in str(exc):
            raise _unloadable(where, exc) from None
        log.warning("%s is not in torch's zip format (a legacy torch.save file?) and cannot be "
                    "memory-mapped; loading it whole", where)
        try:
            obj = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as exc2:
            raise _unloadable(where, exc2) from None
    except Exception as exc:
        raise _unloadable(where, exc) from None
    return _flat_tensors(obj, where)


def _flat_tensors(obj: object, where: str) -> dict[str, torch.Tensor]:
    """The state dict itself; refuses wrappers and non-tensor values, saying what was found."""
    if not isinstance(obj, dict):
        raise WeightsError(f"{where} holds a {type(obj).__name__}, not a dict of tensor name -> "
                           "tensor. Save model.state_dict() itself.", file=where)
    bad = {k: v for k, v in obj.items() if not (
        isinstance(k, str) and isinstance(v, torch.Tensor) and v.layout == torch.strided)}
    if not bad:
        return dict(obj)
    listing = ", ".join(f"{k!r} ({_kind(k, v)})" for k, v in list(bad.items())[:5])
    more = f" and {len(bad) - 5} more" if len(bad) > 5 else ""
    nested = [k for k, v in bad.items() if isinstance(v, dict)]
    hint = (f" It looks like a wrapper; the weights are probably under {nested[0]!r}: save that "
            f"dict itself, e.g. torch.save(obj[{nested[0]!r}], path)." if nested else
            " Keep only the tensors: {k: v for k, v in sd.items() if isinstance(v, "
            "torch.Tensor)}.")
    raise WeightsError(f"{where} is not a flat dict of dense tensors: {listing}{more}.{hint}",
                       file=where)


def _kind(key: object, value: object) -> str:
    if not isinstance(key, str):
        return f"{type(key).__name__} key, not str"
    if isinstance(value, torch.Tensor):
        return f"{value.layout} tensor"
    if isinstance(value, dict):
        return f"dict with keys {list(value)[:4]}"
    return type(value).__name__


def _unloadable(where: str, exc: BaseException) -> WeightsError:
    text = str(exc).strip()
    # torch's message starts with general advice; the unpickler's reason follows this marker.
    _, marker, reason = text.partition("WeightsUnpickler error:")
    detail = (reason.strip().split("\n")[0].split(". ")[0] if marker
              else text.split("\n")[0] or type(exc).__name__)
    if "Unsupported global" in text:
        return WeightsError(
            f"{where} holds objects torch.load(weights_only=True) refuses ({detail}); arbitrary "
            "pickles are never loaded. Re-save a flat dict of tensors.", file=where)
    return WeightsCorruptError(f"{where} cannot be loaded as a torch file ({type(exc).__name__}: "
                               f"{detail}): it is truncated or not a torch.save file. "
                               "Re-download or re-save it.", file=where)


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass

