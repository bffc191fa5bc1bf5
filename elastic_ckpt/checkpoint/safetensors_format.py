"""The safetensors file format, parsed over ranged reads (no local file, no ``safe_open``).

Layout: an 8-byte little-endian header length ``N``, ``N`` bytes of UTF-8 JSON, then the data
region. The JSON maps each tensor name to ``{"dtype", "shape", "data_offsets": [begin, end]}``
(offsets relative to the start of the data region; bytes row-major, little-endian) and may hold
a ``"__metadata__"`` object of strings. Row ``r`` of a tensor is therefore the contiguous byte
range ``begin + r * row_bytes`` .. ``+ row_bytes``, which is what lets a rank read only its rows.
"""

from __future__ import annotations

import dataclasses
import json
import math
import struct
from typing import Any, Protocol

import torch

from elastic_ckpt.checkpoint.export import SAFETENSORS_DTYPES
from elastic_ckpt.checkpoint.manifest import DTYPES as _TORCH_DTYPES
from elastic_ckpt.errors import WeightsCorruptError, WeightsError

MAX_HEADER_BYTES = 100 << 20
"""The header size limit the safetensors library itself enforces; a larger length field means
a corrupt file (and would otherwise make us allocate it)."""

DTYPES: dict[str, torch.dtype] = {code: _TORCH_DTYPES[name]
                                  for name, code in SAFETENSORS_DTYPES.items()}
"""safetensors dtype code -> torch dtype (the inverse of export's table)."""

_REDOWNLOAD = "Re-download or re-export the file."


class RangeReader(Protocol):
    def read_into(self, offset: int, buf) -> int: ...


@dataclasses.dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a safetensors file; ``start``/``stop`` are absolute byte offsets in the
    file, validated to lie inside it."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    stop: int


def read_header(reader: RangeReader, file_size: int,
                where: str) -> tuple[dict[str, SafetensorsEntry], dict[str, Any]]:
    """``(tensors, metadata)`` of the safetensors file of ``file_size`` bytes behind ``reader``.

    Reads only the header (two ranged reads). Guarantees for every entry: a known dtype, a
    non-negative shape, ``stop - start == prod(shape) * itemsize``, ``[start, stop)`` inside
    the file, and no two non-empty entries overlap. Raises ``WeightsCorruptError`` (a
    malformed or truncated file) or ``WeightsError`` (a dtype torch cannot hold), naming
    ``where`` and the tensor.
    """
    if file_size < 8:
        raise _corrupt(where, f"has {file_size} bytes, too short for the 8-byte header length "
                              "(truncated, or not a safetensors file)")
    head = bytearray(8)
    _read_exactly(reader, 0, head, where)
    (length,) = struct.unpack("<Q", head)
    if length > MAX_HEADER_BYTES:
        raise _corrupt(where, f"declares a {length}-byte header (limit {MAX_HEADER_BYTES}); "
                              "it is not a safetensors file or its first bytes are corrupt")
    if 8 + length > file_size:
        raise _corrupt(where, f"declares a {length}-byte header but has only {file_size} bytes: "
                              "the file is truncated")
    text = bytearray(length)
    _read_exactly(reader, 8, text, where)
    try:
        header = json.loads(bytes(text).decode("utf-8"))
    except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
        raise _corrupt(where, f"has a header that is not valid UTF-8 JSON ({exc})") from None
    if not isinstance(header, dict):
        raise _corrupt(where, f"has a JSON header that is a {type(header).__name__}, "
                              "not an object")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise _corrupt(where, f"has a __metadata__ that is a {type(metadata).__name__}, not an "
                              "object")
    data_start = 8 + length
    entries = {name: _entry(name, value, data_start, file_size, where)
               for name, value in header.items()}
    _check_no_overlap(entries, where)
    return entries, metadata


def _entry(name: str, value: Any, data_start: int, file_size: int,
           where: str) -> SafetensorsEntry:
    if not isinstance(value, dict) or not {"dtype", "shape", "data_offsets"} <= value.keys():
        raise _corrupt(where, f"tensor {name!r}: header entry {value!r} lacks dtype, shape "
                              "or data_offsets", name)
    code, shape, offsets = value["dtype"], value["shape"], value["data_offsets"]
    if code not in DTYPES:
        raise WeightsError(
            f"{where}: tensor {name!r} has safetensors dtype {code!r}, which is not supported "
            f"(supported: {' '.join(DTYPES)}). Convert the file or leave that tensor out.",
            file=where, tensor=name)
    if not (isinstance(shape, list) and all(_is_count(d) for d in shape)):
        raise _corrupt(where, f"tensor {name!r}: shape {shape!r} is not a list of "
                              "non-negative ints", name)
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(_is_count, offsets))
            and offsets[0] <= offsets[1]):
        raise _corrupt(where, f"tensor {name!r}: data_offsets {offsets!r} is not "
                              "[begin, end] with 0 <= begin <= end", name)
    dtype = DTYPES[code]
    want = math.prod(shape) * dtype.itemsize
    begin, end = offsets
    if end - begin != want:
        raise _corrupt(where, f"tensor {name!r}: data_offsets {offsets} span {end - begin} "
                              f"bytes but shape {shape} of {code} needs {want}", name)
    if data_start + end > file_size:
        raise _corrupt(where, f"tensor {name!r} needs bytes [{data_start + begin}, "
                              f"{data_start + end}) but the file has {file_size} bytes: it is "
                              "truncated (an interrupted download or copy?) or its header is "
                              "corrupt", name)
    return SafetensorsEntry(dtype, tuple(shape), data_start + begin, data_start + end)


def _check_no_overlap(entries: dict[str, SafetensorsEntry], where: str) -> None:
    """Two tensors sharing bytes means a forged or corrupt header: a write to one would show
    in the other."""
    spans = sorted((e.start, e.stop, name) for name, e in entries.items() if e.stop > e.start)
    for (_, a_stop, a), (b_start, _, b) in zip(spans, spans[1:]):
        if b_start < a_stop:
            raise _corrupt(where, f"tensors {a!r} and {b!r} overlap in the data region", b)


def _is_count(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _read_exactly(reader: RangeReader, offset: int, buf: bytearray, where: str) -> None:
    if reader.read_into(offset, buf) != len(buf):
        raise _corrupt(where, f"ended while reading bytes [{offset}, {offset + len(buf)}): "
                              "the file is truncated")


def _corrupt(where: str, what: str, tensor: str | None = None) -> WeightsCorruptError:
    details = {"file": where} if tensor is None else {"file": where, "tensor": tensor}
    return WeightsCorruptError(f"{where}: {what}. {_REDOWNLOAD}", **details)
