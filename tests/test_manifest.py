"""The on-disk format as pure units: JSON codec for non-tensor state, manifest validation, block
checksums."""

from __future__ import annotations

import json
import math

import crc32c
import numpy as np
import pytest

from elastic_ckpt.checkpoint import checksum
from elastic_ckpt.checkpoint.manifest import (
    FORMAT_VERSION,
    Manifest,
    decode_json_value,
    dumps_value,
    encode_json_value,
    loads_value,
    parse_step_dirname,
    step_dirname,
)
from elastic_ckpt.errors import CheckpointCorruptError


def same(a, b) -> bool:
    """Equality that also requires equal types all the way down (tuple != list, 1 != True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return list(a) == list(b) and all(same(a[k], b[k]) for k in a) and \
            all(type(x) is type(y) for x, y in zip(a, b))
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return a == b


# -- JSON codec ---------------------------------------------------------------------------------
ROUND_TRIPS = [
    None, True, False, 0, -7, 2**70, 1.5, -0.0, "", "text", "ünï",
    [], [1, [2, [3]]], (), (1,), (1, "a", None), ((1, 2), [3, (4,)]),
    {}, {"a": 1, "b": {"c": [1, 2]}},
    {1: "one", 2: "two"}, {(1, 2): "pair"}, {None: 1, True: 2, 1.5: 3},
    {"lr": 0.1, "betas": (0.9, 0.999), "params": ["w", "b"]},
    [{"state": {0: {"step": 3}}, "param_groups": [{"betas": (0.9, 0.99)}]}],
    # dicts that look like the codec's own tags must come back unchanged
    {"__tuple__": [1, 2]}, {"__dict__": []}, {"__float__": "nan"}, {"__tuple__": 1, "x": 2},
    [{"__float__": "inf"}],
    float("inf"), float("-inf"), [float("inf"), (float("-inf"),)], {"x": {"y": float("inf")}},
]


@pytest.mark.parametrize("value", ROUND_TRIPS, ids=repr)
def test_codec_round_trips(value) -> None:
    data = dumps_value(value, "v")
    json.loads(data)  # plain, strict JSON
    assert b"NaN" not in data and b"Infinity" not in data
    assert same(loads_value(data), value), loads_value(data)
    assert same(decode_json_value(json.loads(json.dumps(encode_json_value(value)))), value)


def test_codec_nan() -> None:
    out = loads_value(dumps_value({"a": (float("nan"),)}, "v"))
    assert isinstance(out["a"], tuple) and math.isnan(out["a"][0])


@pytest.mark.parametrize(("value", "path", "type_name"), [
    (object(), "state", "object"),
    ({"opt": {"lr": {1, 2}}}, "state.opt.lr", "set"),
    ({"a": [1, b"bytes"]}, "state.a", "bytes"),
    ({"a": (1, {"deep": complex(1, 2)})}, "state.a.deep", "complex"),
    ({3: {"k": np.int64(1)}}, "state.3.k", "int64"),
])
def test_codec_rejects_unknown_types_naming_the_path(value, path, type_name) -> None:
    with pytest.raises(TypeError, match="not checkpointable") as err:
        encode_json_value(value, "state")
    assert str(err.value).startswith(f"{path}: {type_name} ")


# -- manifest -----------------------------------------------------------------------------------
BLOCK = 16


def manifest_doc(**overrides) -> dict:
    """A valid manifest: a float32 (4, 3) tensor in two row chunks of 24 bytes (2 blocks each)."""
    sums = checksum.encode(np.zeros(2, dtype="<u4"))
    chunk = {"offsets": [0, 0], "lengths": [2, 3], "file": "rank-00000.bin", "byte_offset": 0,
             "byte_length": 24, "rank": 0, "checksums": sums}
    doc = {
        "format_version": FORMAT_VERSION, "step": 5, "world_size": 2, "mesh_shape": [2],
        "created_unix_s": 1.0, "versions": {"torch": "x"}, "block_size_bytes": BLOCK,
        "tensors": {"w": {"dtype": "float32", "shape": [4, 3], "placements": ["Shard(dim=0)"],
                          "chunks": [chunk, {**chunk, "offsets": [2, 0], "rank": 1,
                                             "file": "rank-00001.bin"}]}},
        "objects": {"o": {"__tuple__": [1]}}, "extra": {"cursor": 3},
    }
    doc.update(overrides)
    return doc


def chunk_edit(**changes) -> dict:
    doc = manifest_doc()
    doc["tensors"]["w"]["chunks"][0].update(changes)
    return doc


def test_valid_manifest_round_trips() -> None:
    m = Manifest.from_json(json.dumps(manifest_doc()).encode(), "m.json")
    assert m.total_bytes == 48 and m.tensors["w"].nbytes == 48 and m.tensors["w"].itemsize == 4
    assert Manifest.from_json(m.to_json(), "again") == m


@pytest.mark.parametrize(("doc", "field", "words"), [
    (chunk_edit(byte_length=23), "", "byte_length 23, expected 24"),
    (chunk_edit(checksums=checksum.encode(np.zeros(1, dtype="<u4"))), "", "number of checksums"),
    (chunk_edit(checksums=checksum.encode(np.zeros(3, dtype="<u4"))), "", "number of checksums"),
    (chunk_edit(offsets=[4, 0]), "", "outside shape"),
    (chunk_edit(offsets=[1, 0]), "", "overlap"),
    (chunk_edit(offsets=[2, 0]), "", "overlap"),  # one box saved twice
    (chunk_edit(lengths=[1, 3], byte_length=12,
                checksums=checksum.encode(np.zeros(1, dtype="<u4"))), "", "missing data"),
    (chunk_edit(offsets=[0]), "", "chunk rank does not match"),
    (chunk_edit(byte_offset=-1), "byte_offset", "greater than or equal to 0"),
    (chunk_edit(file="../x"), "file", "'../x' is not a plain file name"),
    (chunk_edit(file="a/b"), "file", "'a/b' is not a plain file name"),
    (chunk_edit(file=".."), "file", "not a plain file name"),
    (manifest_doc(format_version=FORMAT_VERSION + 1), "format_version", "upgrade elastic_ckpt"),
    (manifest_doc(format="other"), "format", ""),
    (manifest_doc(block_size_bytes=0), "block_size_bytes", ""),
    (manifest_doc(world_size=0), "world_size", ""),
    (manifest_doc(unexpected=1), "unexpected", "Extra inputs"),
    ({k: v for k, v in manifest_doc().items() if k != "step"}, "step", "Field required"),
])
def test_invalid_manifest_is_corrupt(doc, field, words) -> None:
    with pytest.raises(CheckpointCorruptError, match="is not a valid elastic_ckpt manifest") as err:
        Manifest.from_json(json.dumps(doc).encode(), "root/step-00000005/manifest.json")
    message = str(err.value)
    assert message.startswith("root/step-00000005/manifest.json ") and words in message
    assert err.value.file == "root/step-00000005/manifest.json"
    assert err.value.field.endswith(field)


def test_unknown_dtype_is_corrupt() -> None:
    doc = manifest_doc()
    doc["tensors"]["w"]["dtype"] = "float33"
    with pytest.raises(CheckpointCorruptError, match="unknown dtype 'float33'") as err:
        Manifest.from_json(json.dumps(doc).encode(), "m.json")
    assert err.value.field == "tensors.w.dtype"


@pytest.mark.parametrize("data", [b"", b"{", b"not json", b"[]", b"null", b"\xff\xfe"])
def test_malformed_json_is_corrupt(data) -> None:
    with pytest.raises(CheckpointCorruptError, match="m.json"):
        Manifest.from_json(data, "m.json")


@pytest.mark.parametrize(("name", "step"), [
    ("step-00000120", 120), ("step-123456789", 123456789), ("step-0000012", None),
    ("step-00000120.tmp", None), ("xstep-00000120", None), ("step--0000012", None),
])
def test_step_dirnames(name, step) -> None:
    assert parse_step_dirname(name) == step
    if step is not None:
        assert parse_step_dirname(step_dirname(step)) == step


# -- checksums ----------------------------------------------------------------------------------
@pytest.mark.parametrize(("start", "stop", "nbytes", "span"), [
    (0, 100, 100, (0, 100)),
    (5, 10, 100, (0, 16)),
    (16, 32, 100, (16, 32)),
    (15, 17, 100, (0, 32)),
    (90, 100, 100, (80, 100)),   # last block is short: never past the end of the chunk
    (33, 34, 40, (32, 40)),
    (0, 0, 0, (0, 0)),
])
def test_block_span(start, stop, nbytes, span) -> None:
    assert checksum.block_span(start, stop, nbytes, 16) == span


def test_block_checksums_cover_fixed_blocks() -> None:
    data = bytes(range(256)) * 3 + b"tail"
    sums = checksum.block_checksums(data, 100)
    assert len(sums) == checksum.num_blocks(len(data), 100) == 8 and sums.dtype == np.dtype("<u4")
    assert [int(s) for s in sums] == [crc32c.crc32c(data[i:i + 100]) for i in range(0, 772, 100)]
    assert len(checksum.block_checksums(b"", 100)) == 0
    assert np.array_equal(checksum.decode(checksum.encode(sums)), sums)


def test_incremental_crc() -> None:
    assert checksum.crc(b"123456789") == 0xE3069283  # the crc32c check value
    data = bytes(range(200))
    for cut in (0, 1, 77, 199, 200):
        assert checksum.crc(data[cut:], checksum.crc(data[:cut])) == checksum.crc(data)
    assert checksum.crc(memoryview(data)[10:20]) == checksum.crc(data[10:20])
