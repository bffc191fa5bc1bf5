"""Export a committed checkpoint as one full (unsharded) state dict for inference.

Each global tensor is assembled from its chunks by verified ranged reads (``ChunkReader``)
straight into a tensor allocated once at its final size: a chunk made of whole rows (every
FSDP2 ``Shard(0)`` chunk) lands directly in its rows; any other chunk is read a bounded
piece of rows at a time and copied into its box. Nothing is ever held twice:

- ``safetensors``: the header is computed from the manifest up front, then tensors are
  assembled and streamed one at a time, so peak memory is the largest tensor.
- ``torch``: the dict is built one tensor at a time and ``torch.save``d, so peak memory is
  the exported state itself.

Only tensors are exported; non-tensor leaves (optimizer hyper-parameters, the data cursor,
``extra``) stay in the checkpoint. Single process, no ``torch.distributed``. A Hugging Face
model directory (sharded safetensors, index, config.json) is ``export_hf``'s job, built on
``write_safetensors`` here.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import struct
from concurrent.futures import ThreadPoolExecutor
from typing import Literal

import torch

from elastic_ckpt.checkpoint.catalog import open_checkpoint
from elastic_ckpt.checkpoint.manifest import (
    ChunkEntry,
    Manifest,
    TensorEntry,
    is_whole_rows,
)
from elastic_ckpt.checkpoint.reader import ChunkReader
from elastic_ckpt.errors import CheckpointError
from elastic_ckpt.storage import Storage

ExportFormat = Literal["safetensors", "torch"]
EXPORT_FORMATS: tuple[str, ...] = ("safetensors", "torch")

SAFETENSORS_DTYPES: dict[str, str] = {
    "float64": "F64", "float32": "F32", "float16": "F16", "bfloat16": "BF16",
    "int64": "I64", "int32": "I32", "int16": "I16", "int8": "I8", "uint8": "U8",
    "bool": "BOOL", "float8_e4m3fn": "F8_E4M3", "float8_e5m2": "F8_E5M2",
}
"""Checkpoint dtype name -> safetensors dtype code (complex dtypes have none)."""

_PIECE_BYTES = 64 << 20
"""Bound on the temporary buffer for a chunk that is not a run of whole rows."""


@dataclasses.dataclass(frozen=True)
class ExportReport:
    checkpoint_uri: str
    output_uri: str
    step: int
    format: str
    num_tensors: int
    """Tensors written."""
    total_bytes: int
    """Tensor bytes written (excluding any file header)."""
    num_skipped_tensors: int
    """Tensors left out because their key does not start with the prefix."""
    num_objects: int
    """Non-tensor leaves in the checkpoint (never exported)."""


def normalize_prefix(prefix: str) -> str:
    """``"app.model"`` and ``"app.model."`` both select ``app.model.*``; ``""`` selects all."""
    return prefix if not prefix or prefix.endswith(".") else prefix + "."


def select_tensors(manifest: Manifest, prefix: str = "") -> dict[str, str]:
    """``{exported name: checkpoint key}`` for the tensors whose key starts with ``prefix``
    (stripped from the exported name), in manifest order.

    Raises ``CheckpointError`` if nothing matches, listing the key prefixes that exist.
    """
    prefix = normalize_prefix(prefix)
    selected = {fqn[len(prefix):]: fqn for fqn in manifest.tensors if fqn.startswith(prefix)}
    if not selected:
        heads = sorted({".".join(parts[:min(2, len(parts) - 1)]) + "."
                        for parts in (k.split(".") for k in manifest.tensors) if len(parts) > 1})
        raise CheckpointError(
            f"no tensor key starts with {prefix!r}. The checkpoint's tensor keys start with: "
            f"{' '.join(heads[:8]) or '(it has no tensors)'}",
            prefix=prefix)
    return selected


def export_checkpoint(checkpoint_uri: str, output_uri: str, format: ExportFormat,
                      prefix: str = "", *, overwrite: bool = False,
                      num_threads: int = 4) -> ExportReport:
    """Write the tensors of the committed checkpoint at ``checkpoint_uri`` whose keys start
    with ``prefix`` (stripped) to ``output_uri`` as one ``format`` file.

    Every byte read is checksum-verified. Raises ``CheckpointNotFoundError`` /
    ``CheckpointNotCommittedError`` / ``CheckpointCorruptError`` for a bad checkpoint,
    ``CheckpointError`` for a bad prefix, an unexportable dtype or an existing output (unless
    ``overwrite``), ``StorageError`` when the output cannot be written. On failure no output
    file is left behind (an existing one replaced with ``overwrite`` is gone too).
    """
    if format not in EXPORT_FORMATS:
        raise CheckpointError(f"unknown export format {format!r}; choose one of "
                              f"{', '.join(EXPORT_FORMATS)} (a Hugging Face model directory: "
                              "export_hf.export_hf)", format=format)
    directory, manifest = open_checkpoint(Storage(checkpoint_uri))
    names = select_tensors(manifest, prefix)
    if format == "safetensors":
        header = safetensors_header(manifest, names)
    parent, filename = _split_output(output_uri)
    if parent.exists(filename) and not overwrite:
        raise CheckpointError(f"{parent.uri_of(filename)} already exists; pass --overwrite "
                              "to replace it or choose another output path", path=output_uri)
    parent.makedirs()
    reader = ChunkReader(directory, manifest, check_extents=True)
    with parent.open_write(filename) as out:
        if format == "safetensors":
            write_safetensors(out, reader, names, header, num_threads=num_threads)
        else:
            state = {name: assemble_tensor(reader, fqn, num_threads=num_threads)
                     for name, fqn in names.items()}
            torch.save(state, _FlushableWriter(out))
    return ExportReport(
        checkpoint_uri=directory.uri, output_uri=parent.uri_of(filename), step=manifest.step,
        format=format, num_tensors=len(names),
        total_bytes=sum(manifest.tensors[f].nbytes for f in names.values()),
        num_skipped_tensors=len(manifest.tensors) - len(names),
        num_objects=len(manifest.objects))


# -- assembling one tensor -----------------------------------------------------------------
def assemble_tensor(reader: ChunkReader, fqn: str, *, num_threads: int = 4,
                    piece_bytes: int = _PIECE_BYTES) -> torch.Tensor:
    """The full global tensor ``fqn``, allocated once and filled chunk by chunk with verified
    reads. Chunks are read in parallel (disjoint destinations); a chunk that is not a run of
    whole rows goes through a temporary of at most about ``piece_bytes`` (one row at least).

    Relies on the manifest having been validated (``Manifest`` parsing refuses chunks that do
    not tile the shape exactly), so every element of the result is written exactly once."""
    entry = reader.manifest.tensors[fqn]
    full = torch.empty(entry.shape, dtype=entry.torch_dtype)
    chunks = sorted(entry.chunks, key=lambda c: (c.file, c.byte_offset))
    if num_threads > 1 and len(chunks) > 1:
        with ThreadPoolExecutor(min(num_threads, len(chunks)),
                                thread_name_prefix="ckpt-export") as pool:
            list(pool.map(lambda c: _fill_chunk(reader, fqn, entry, c, full, piece_bytes),
                          chunks))
    else:
        for chunk in chunks:
            _fill_chunk(reader, fqn, entry, chunk, full, piece_bytes)
    return full


def _fill_chunk(reader: ChunkReader, fqn: str, entry: TensorEntry, chunk: ChunkEntry,
                full: torch.Tensor, piece_bytes: int) -> None:
    if not entry.shape:  # a scalar: one chunk, the whole tensor
        reader.read_rows(fqn, entry, chunk, 0, 0, out=full)
        return
    rows_of_chunk = chunk.lengths[0]
    if is_whole_rows(chunk.offsets, chunk.lengths, entry.shape):
        # Contiguous in ``full``: read straight into it.
        dest = full.narrow(0, chunk.offsets[0], rows_of_chunk)
        reader.read_rows(fqn, entry, chunk, 0, rows_of_chunk, out=dest)
        return
    box = full
    for dim in range(1, len(entry.shape)):
        box = box.narrow(dim, chunk.offsets[dim], chunk.lengths[dim])
    row_bytes = math.prod(chunk.lengths[1:]) * entry.itemsize
    step = max(1, piece_bytes // row_bytes) if row_bytes else rows_of_chunk or 1
    for row0 in range(0, rows_of_chunk, step):
        nrows = min(step, rows_of_chunk - row0)
        piece, _ = reader.read_rows(fqn, entry, chunk, row0, nrows)
        box.narrow(0, chunk.offsets[0] + row0, nrows).copy_(piece)


# -- safetensors -----------------------------------------------------------------------------
def _safetensors_order(manifest: Manifest, names: dict[str, str]) -> list[tuple[str, str]]:
    """Data order: widest dtype first, then by name, so every tensor's bytes start at a
    multiple of its item size (the header is padded to 8 bytes)."""
    return sorted(names.items(), key=lambda kv: (-manifest.tensors[kv[1]].itemsize, kv[0]))


def safetensors_header(manifest: Manifest, names: dict[str, str]) -> bytes:
    """The 8-byte little-endian length plus the JSON header (space-padded to a multiple of 8
    bytes) for ``names`` (exported name -> checkpoint key), computed from the manifest alone.
    Raises ``CheckpointError`` for a dtype safetensors cannot represent."""
    header: dict[str, object] = {"__metadata__": {
        "format": "pt", "step": str(manifest.step), "source": "elastic_ckpt"}}
    offset = 0
    for name, fqn in _safetensors_order(manifest, names):
        entry = manifest.tensors[fqn]
        code = SAFETENSORS_DTYPES.get(entry.dtype)
        if code is None:
            raise CheckpointError(
                f"tensor {fqn!r} has dtype {entry.dtype}, which safetensors cannot store; "
                "export with --format torch or select other tensors with --prefix", tensor=fqn)
        header[name] = {"dtype": code, "shape": list(entry.shape),
                        "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


def write_safetensors(out, reader: ChunkReader, names: dict[str, str], header: bytes, *,
                      num_threads: int = 4) -> None:
    """Stream one safetensors file to ``out`` (anything with ``write``): ``header`` (from
    ``safetensors_header(reader.manifest, names)``), then each tensor of ``names`` (exported
    name -> checkpoint key) assembled and written one at a time, in the header's data order,
    so peak memory is the largest tensor."""
    out.write(header)
    for _, fqn in _safetensors_order(reader.manifest, names):
        out.write(_byte_view(assemble_tensor(reader, fqn, num_threads=num_threads)))


def _byte_view(tensor: torch.Tensor) -> memoryview:
    # ``full`` is freshly allocated and contiguous: a zero-copy view of its bytes.
    return memoryview(tensor.reshape(-1).view(torch.uint8).numpy())


# -- output ------------------------------------------------------------------------------------
def _split_output(output_uri: str) -> tuple[Storage, str]:
    """``(storage of the parent directory, file name)`` of an output path or URI."""
    if "://" not in output_uri:
        path = os.path.abspath(output_uri)
        parent, name = os.path.dirname(path), os.path.basename(path)
    else:
        parent, _, name = output_uri.rstrip("/").rpartition("/")
    if not name or output_uri.endswith(("/", os.sep)):
        raise CheckpointError(f"export output {output_uri!r} must name a file, not a directory",
                              path=output_uri)
    return Storage(parent), name


class _FlushableWriter:
    """The ``write``/``flush`` file protocol ``torch.save`` needs, over a storage writer."""

    def __init__(self, writer) -> None:
        self._writer = writer

    def write(self, data) -> int:
        return self._writer.write(data)

    def flush(self) -> None:  # durability comes from the storage writer's close
        pass

