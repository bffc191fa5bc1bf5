"""Fixed-size block checksums (crc32c) over a chunk's bytes.

A chunk of ``n`` bytes has ``ceil(n / block_size)`` checksums, block ``i`` covering bytes
``[i * block_size, min((i + 1) * block_size, n))`` of the chunk. A reader that needs bytes
``[a, b)`` of a chunk reads the blocks that overlap that range — the head of the first and the
tail of the last block are the only bytes it reads beyond what it needs — and verifies them.
Checksums are stored as base64 of little-endian uint32, which keeps the manifest plain JSON
and compact (about 5.3 characters per block).
"""

from __future__ import annotations

import base64

import crc32c
import numpy as np


def num_blocks(nbytes: int, block_size: int) -> int:
    return (nbytes + block_size - 1) // block_size


def block_checksums(data, block_size: int) -> np.ndarray:
    """crc32c of each ``block_size`` block of ``data`` (any buffer), as uint32."""
    view = memoryview(data).cast("B")
    n = len(view)
    out = np.empty(num_blocks(n, block_size), dtype="<u4")
    for i, start in enumerate(range(0, n, block_size)):
        out[i] = crc32c.crc32c(view[start : start + block_size])
    return out


def encode(sums: np.ndarray) -> str:
    return base64.b64encode(np.asarray(sums, dtype="<u4").tobytes()).decode("ascii")


def decode(text: str) -> np.ndarray:
    return np.frombuffer(base64.b64decode(text.encode("ascii"), validate=True), dtype="<u4")


def block_span(start: int, stop: int, nbytes: int, block_size: int) -> tuple[int, int]:
    """The block-aligned byte range ``[A, B)`` of a chunk that covers ``[start, stop)``."""
    first = (start // block_size) * block_size
    last = min(nbytes, -(-stop // block_size) * block_size)
    return first, last


def crc(data, value: int = 0) -> int:
    """Incremental crc32c: ``crc(b, crc(a)) == crc(a + b)``."""
    return crc32c.crc32c(data, value)
