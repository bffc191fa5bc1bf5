"""``export_checkpoint``: full tensors assembled from shards, bit for bit, in both formats."""

from __future__ import annotations

import json
import os
import struct
import time
import warnings

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from elastic_ckpt.checkpoint import checksum
from elastic_ckpt.checkpoint.catalog import open_checkpoint
from elastic_ckpt.checkpoint.export import assemble_tensor, export_checkpoint, select_tensors
from elastic_ckpt.checkpoint.manager import CheckpointManager
from elastic_ckpt.checkpoint.manifest import (
    COMMITTED_FILE,
    FORMAT_VERSION,
    MANIFEST_FILE,
    ChunkEntry,
    Manifest,
    TensorEntry,
    dtype_name,
    rank_filename,
    step_dirname,
)
from elastic_ckpt.checkpoint.reader import ChunkReader
from elastic_ckpt.checkpoint.verify import verify
from elastic_ckpt.errors import (
    CheckpointCorruptError,
    CheckpointError,
    CheckpointNotCommittedError,
)
from elastic_ckpt.storage import Storage


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal dtype, shape and bytes (NaN payloads and -0.0 included)."""
    return (a.dtype == b.dtype and a.shape == b.shape
            and torch.equal(a.reshape(-1).view(torch.uint8),
                            b.contiguous().reshape(-1).view(torch.uint8)))


def sample_state() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    bf16_bits = torch.randint(-2**15, 2**15, (6, 5), generator=g, dtype=torch.int16)
    return {
        "w": torch.randn(7, 3, generator=g),
        "bf16": bf16_bits.view(torch.bfloat16),  # arbitrary bit patterns, NaNs included
        "f16": torch.randn(4, 2, 2, generator=g).half(),
        "f64": torch.randn(3, generator=g, dtype=torch.float64),
        "i64": torch.arange(5),
        "i8": torch.tensor([-3, 4], dtype=torch.int8),
        "u8": torch.tensor([1, 255], dtype=torch.uint8),
        "mask": torch.tensor([True, False, True]),
        "scalar": torch.tensor(2.5),
    }


def save_single(root, step: int, state: dict) -> str:
    """A committed checkpoint from one process (no torch.distributed); returns its URI."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP: "assuming single process"
        info = CheckpointManager(str(root), keep_last=None).save(step, state)
    return info.uri


@pytest.fixture
def ckpt(tmp_path):
    state = {"model": sample_state(), "other": {"t": torch.ones(2), "lr": 0.1},
             "cursor": {"step": 3}}
    return save_single(tmp_path / "ckpts", 5, state), state


def test_safetensors_export_is_bit_exact_and_loads(ckpt, tmp_path):
    uri, state = ckpt
    out = tmp_path / "model.safetensors"
    report = export_checkpoint(uri, str(out), "safetensors", prefix="model.")
    loaded = load_file(str(out))
    assert set(loaded) == set(state["model"])
    for name, tensor in state["model"].items():
        assert same_bits(loaded[name], tensor), name
    assert report.num_tensors == len(state["model"])
    assert report.num_skipped_tensors == 1  # other.t
    assert report.num_objects == 1  # other.lr
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["step"] == "5"


def test_safetensors_layout_header_padded_and_data_aligned(ckpt, tmp_path):
    uri, _ = ckpt
    out = tmp_path / "all.safetensors"
    export_checkpoint(uri, str(out), "safetensors")
    raw = out.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    assert n % 8 == 0
    header = json.loads(raw[8:8 + n])
    header.pop("__metadata__")
    spans = sorted(v["data_offsets"] for v in header.values())
    assert spans[0][0] == 0 and spans[-1][1] == len(raw) - 8 - n
    assert all(a[1] == b[0] for a, b in zip(spans, spans[1:]))  # no holes
    itemsize = {"F64": 8, "I64": 8, "F32": 4, "F16": 2, "BF16": 2}
    for v in header.values():
        assert v["data_offsets"][0] % itemsize.get(v["dtype"], 1) == 0


def test_torch_export_is_bit_exact(ckpt, tmp_path):
    uri, state = ckpt
    out = tmp_path / "all.pt"
    export_checkpoint(uri, str(out), "torch")
    loaded = torch.load(str(out), weights_only=True)
    assert set(loaded) == {f"model.{k}" for k in state["model"]} | {"other.t"}
    for name, tensor in state["model"].items():
        assert same_bits(loaded[f"model.{name}"], tensor), name


def test_prefix_selection_implies_trailing_dot(ckpt):
    uri, _ = ckpt
    _, manifest = open_checkpoint(Storage(uri))
    assert select_tensors(manifest, "model") == select_tensors(manifest, "model.")
    assert select_tensors(manifest, "other") == {"t": "other.t"}
    assert len(select_tensors(manifest, "")) == len(manifest.tensors)
    with pytest.raises(CheckpointError, match="model. other."):
        select_tensors(manifest, "mod")


def test_refuses_to_overwrite_unless_asked(ckpt, tmp_path):
    uri, _ = ckpt
    out = tmp_path / "m.pt"
    out.write_bytes(b"keep me")
    with pytest.raises(CheckpointError, match="already exists"):
        export_checkpoint(uri, str(out), "torch")
    assert out.read_bytes() == b"keep me"
    export_checkpoint(uri, str(out), "torch", overwrite=True)
    assert "model.w" in torch.load(str(out), weights_only=True)


def test_creates_missing_output_directories(ckpt, tmp_path):
    uri, _ = ckpt
    out = tmp_path / "a" / "b" / "m.safetensors"
    export_checkpoint(uri, str(out), "safetensors", prefix="model")
    assert "w" in load_file(str(out))


def test_uncommitted_checkpoint_is_refused(ckpt, tmp_path):
    uri, _ = ckpt
    os.remove(os.path.join(uri, COMMITTED_FILE))
    out = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointNotCommittedError, match="no COMMITTED marker"):
        export_checkpoint(uri, str(out), "safetensors")
    assert not out.exists()


def test_corrupt_byte_fails_and_leaves_no_output(ckpt, tmp_path):
    uri, _ = ckpt
    _, manifest = open_checkpoint(Storage(uri))
    chunk = manifest.tensors["model.bf16"].chunks[0]
    path = os.path.join(uri, chunk.file)
    data = bytearray(open(path, "rb").read())
    data[chunk.byte_offset + 3] ^= 0x01
    open(path, "wb").write(bytes(data))
    out = tmp_path / "m.safetensors"
    with pytest.raises(CheckpointCorruptError, match=r"model\.bf16") as info:
        export_checkpoint(uri, str(out), "safetensors")
    assert info.value.file == chunk.file
    assert not out.exists()


def test_complex_dtype_needs_torch_format(tmp_path):
    c = torch.randn(3, dtype=torch.complex64)
    uri = save_single(tmp_path / "ckpts", 1, {"m": {"c": c}})
    with pytest.raises(CheckpointError, match="--format torch"):
        export_checkpoint(uri, str(tmp_path / "c.safetensors"), "safetensors")
    export_checkpoint(uri, str(tmp_path / "c.pt"), "torch")
    assert same_bits(torch.load(str(tmp_path / "c.pt"), weights_only=True)["m.c"], c)


# -- chunks that are not whole rows (2-D grids, column shards) -----------------------------
def write_grid_checkpoint(root, full: dict[str, torch.Tensor], splits: dict[str, tuple],
                          block_size: int = 64, drop: tuple[str, int] | None = None) -> str:
    """A committed checkpoint written by hand: tensor ``name`` cut into a grid of
    ``splits[name]`` parts per dim, chunk ``i`` "written" by rank ``i % 2``. ``drop`` leaves
    one chunk out of the manifest."""
    directory = Storage(str(root)).child(step_dirname(1))
    directory.makedirs()
    files: dict[int, bytearray] = {0: bytearray(), 1: bytearray()}
    tensors = {}
    for name, tensor in full.items():
        chunks = []
        for i, (offsets, lengths) in enumerate(_grid(tensor.shape, splits[name])):
            piece = tensor
            for dim, (o, n) in enumerate(zip(offsets, lengths)):
                piece = piece.narrow(dim, o, n)
            data = piece.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
            rank = i % 2
            if (name, i) != drop:
                chunks.append(ChunkEntry(
                    offsets=offsets, lengths=lengths, file=rank_filename(rank),
                    byte_offset=len(files[rank]), byte_length=len(data), rank=rank,
                    checksums=checksum.encode(checksum.block_checksums(data, block_size))))
            files[rank] += data
        tensors[name] = TensorEntry(dtype=dtype_name(tensor.dtype), shape=tuple(tensor.shape),
                                    placements=("Shard(dim=1)",), chunks=chunks)
    for rank, data in files.items():
        directory.write_atomic(rank_filename(rank), bytes(data))
    # model_construct skips validation, so a manifest with a dropped chunk can be written.
    make = Manifest.model_construct if drop else Manifest
    manifest = make(format_version=FORMAT_VERSION, step=1, world_size=2, mesh_shape=(2,),
                    created_unix_s=time.time(), versions={}, block_size_bytes=block_size,
                    tensors=tensors, format="elastic_ckpt", checksum_algorithm="crc32c",
                    mesh_dim_names=None, objects={}, flatten_mappings={}, extra={})
    directory.write_atomic(MANIFEST_FILE, manifest.to_json())
    directory.write_atomic(COMMITTED_FILE, b"")
    return directory.uri


def _grid(shape, parts):
    per_dim = []
    for size, n in zip(shape, parts):
        bounds = [size * k // n for k in range(n + 1)]
        per_dim.append([(a, b - a) for a, b in zip(bounds, bounds[1:])])
    boxes = [((), ())]
    for options in per_dim:
        boxes = [(o + (a,), ln + (n,)) for o, ln in boxes for a, n in options]
    return boxes


GRID_TENSORS = {
    "cols": (torch.randn(9, 10, generator=torch.Generator().manual_seed(1)), (1, 2)),
    "grid": (torch.randn(6, 8, 5, generator=torch.Generator().manual_seed(2))
             .to(torch.bfloat16), (2, 2, 1)),
    "rows": (torch.arange(12, dtype=torch.int32).reshape(4, 3), (2, 1)),
}


@pytest.mark.parametrize("piece_bytes", [1, 64 << 20])
def test_assemble_grid_chunks(tmp_path, piece_bytes):
    full = {k: t for k, (t, _) in GRID_TENSORS.items()}
    uri = write_grid_checkpoint(tmp_path, full, {k: s for k, (_, s) in GRID_TENSORS.items()})
    directory, manifest = open_checkpoint(Storage(uri))
    reader = ChunkReader(directory, manifest)
    for name, tensor in full.items():
        for threads in (1, 4):
            out = assemble_tensor(reader, name, num_threads=threads, piece_bytes=piece_bytes)
            assert same_bits(out, tensor), (name, threads)


def test_export_grid_checkpoint_both_formats(tmp_path):
    full = {k: t for k, (t, _) in GRID_TENSORS.items()}
    uri = write_grid_checkpoint(tmp_path, full, {k: s for k, (_, s) in GRID_TENSORS.items()})
    export_checkpoint(uri, str(tmp_path / "g.safetensors"), "safetensors")
    export_checkpoint(uri, str(tmp_path / "g.pt"), "torch")
    for loaded in (load_file(str(tmp_path / "g.safetensors")),
                   torch.load(str(tmp_path / "g.pt"), weights_only=True)):
        for name, tensor in full.items():
            assert same_bits(loaded[name], tensor), name


def test_missing_chunk_is_reported_not_left_uninitialized(tmp_path):
    t = torch.randn(4, 6)
    uri = write_grid_checkpoint(tmp_path, {"w": t}, {"w": (2, 2)}, drop=("w", 3))
    out = tmp_path / "w.safetensors"
    # The manifest validator refuses it before any byte is read or written.
    with pytest.raises(CheckpointCorruptError, match=r"'w'.*cover 18 of 24"):
        export_checkpoint(uri, str(out), "safetensors")
    assert not out.exists()
    with pytest.raises(CheckpointCorruptError, match=r"'w'.*cover 18 of 24"):
        verify(uri)
