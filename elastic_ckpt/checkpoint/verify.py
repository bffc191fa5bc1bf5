"""``verify``: re-read every chunk of a committed checkpoint and check every block."""

from __future__ import annotations

import dataclasses

import numpy as np

from elastic_ckpt.checkpoint.catalog import open_checkpoint
from elastic_ckpt.checkpoint.reader import ChunkReader
from elastic_ckpt.errors import CheckpointCorruptError
from elastic_ckpt.storage import Storage

_VERIFY_BUFFER_BYTES = 64 << 20


@dataclasses.dataclass(frozen=True)
class VerifyReport:
    uri: str
    step: int
    num_tensors: int
    num_chunks: int
    bytes_checked: int


def verify(checkpoint_uri: str) -> VerifyReport:
    """Check a committed checkpoint directory end to end (local, single process).

    Raises ``CheckpointNotFoundError`` / ``CheckpointNotCommittedError`` if it is not a
    committed checkpoint, and ``CheckpointCorruptError`` naming the file and tensor on the
    first bad byte, truncated or missing file, or an invalid manifest.
    """
    directory, manifest = open_checkpoint(Storage(checkpoint_uri))
    chunks = ChunkReader(directory, manifest, check_extents=True)
    checked = num_chunks = 0
    # Large chunks are read in pieces so memory stays bounded; pieces align to blocks.
    piece = max(manifest.block_size_bytes,
                _VERIFY_BUFFER_BYTES // manifest.block_size_bytes * manifest.block_size_bytes)
    buf = np.empty(piece, dtype=np.uint8)
    for fqn, entry in manifest.tensors.items():
        for chunk in entry.chunks:
            for start in range(0, chunk.byte_length, piece):
                n = min(piece, chunk.byte_length - start)
                checked += chunks.read_range(fqn, chunk, start, buf[:n])
            num_chunks += 1
    _check_no_overlap(directory, manifest)
    return VerifyReport(uri=directory.uri, step=manifest.step, num_tensors=len(manifest.tensors),
                        num_chunks=num_chunks, bytes_checked=checked)


def _check_no_overlap(directory: Storage, manifest) -> None:
    """Two chunks sharing bytes of a file means a forged or corrupt manifest."""
    spans: dict[str, list[tuple[int, int, str]]] = {}
    for fqn, entry in manifest.tensors.items():
        for c in entry.chunks:
            spans.setdefault(c.file, []).append((c.byte_offset, c.byte_offset + c.byte_length,
                                                 fqn))
    for file, items in spans.items():
        items.sort()
        for (a0, a1, fa), (b0, _b1, fb) in zip(items, items[1:]):
            if b0 < a1:
                raise CheckpointCorruptError(
                    f"{directory.uri_of('manifest.json')}: tensors {fa!r} and {fb!r} overlap in "
                    f"{file} at bytes [{b0}, {a1})", file=file, tensor=fb)
