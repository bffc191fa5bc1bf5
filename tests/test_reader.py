"""``ChunkReader.read_range``: any byte range of a chunk reads exactly those bytes, touches
only the checksum blocks that overlap it, and a flipped byte anywhere in those blocks is
caught and named by its block, whichever verify path (inner run or edge block) covers it."""

from __future__ import annotations

import random

import numpy as np
import pytest

from elastic_ckpt.checkpoint import checksum
from elastic_ckpt.checkpoint.manifest import ChunkEntry
from elastic_ckpt.checkpoint.reader import ChunkReader
from elastic_ckpt.errors import CheckpointCorruptError
from elastic_ckpt.storage import Storage

BLOCK = 64


class _Manifest:
    block_size_bytes = BLOCK
    tensors: dict = {}


def _chunk_file(tmp_path, nbytes: int, pad: int) -> tuple[ChunkReader, ChunkEntry, np.ndarray]:
    """One file holding ``pad`` bytes of another chunk, then a chunk of ``nbytes``."""
    rng = np.random.default_rng(nbytes)
    data = rng.integers(0, 256, nbytes, dtype=np.uint8)
    (tmp_path / "rank-00000.bin").write_bytes(bytes(pad) + data.tobytes())
    chunk = ChunkEntry.model_construct(
        offsets=[0], lengths=[nbytes], file="rank-00000.bin", byte_offset=pad,
        byte_length=nbytes, checksums=checksum.encode(checksum.block_checksums(data, BLOCK)))
    return ChunkReader(Storage(str(tmp_path)), _Manifest()), chunk, data


def _ranges(nbytes: int, rng: random.Random) -> list[tuple[int, int]]:
    fixed = [(0, nbytes), (1, nbytes - 1), (BLOCK, 2 * BLOCK), (nbytes // 2, nbytes),
             (0, nbytes // 3), (nbytes - 1, nbytes)]
    picked = [tuple(sorted(rng.sample(range(nbytes + 1), 2))) for _ in range(40)]
    return [(a, b) for a, b in fixed + picked if 0 <= a < b <= nbytes]


@pytest.mark.parametrize("nbytes", [1, BLOCK - 1, BLOCK, 3 * BLOCK + 17, 10 * BLOCK])
def test_any_range_reads_its_bytes_and_catches_any_flip(tmp_path, nbytes: int) -> None:
    reader, chunk, data = _chunk_file(tmp_path, nbytes, pad=13)
    path = tmp_path / "rank-00000.bin"
    pristine = path.read_bytes()
    rng = random.Random(nbytes)
    for start, stop in _ranges(nbytes, rng):
        out = np.zeros(stop - start, dtype=np.uint8)
        nread = reader.read_range("t", chunk, start, out)
        assert out.tobytes() == data[start:stop].tobytes()
        lo, hi = checksum.block_span(start, stop, nbytes, BLOCK)
        assert nread == hi - lo
        pos = rng.randrange(lo, hi)  # inside a block this read verifies
        damaged = bytearray(pristine)
        damaged[13 + pos] ^= 0x40
        path.write_bytes(bytes(damaged))
        with pytest.raises(CheckpointCorruptError, match=rf"block {pos // BLOCK}\.") as err:
            reader.read_range("t", chunk, start, np.zeros(stop - start, dtype=np.uint8))
        assert err.value.tensor == "t" and err.value.file == "rank-00000.bin"
        path.write_bytes(pristine)
