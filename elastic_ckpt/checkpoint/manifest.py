"""The on-disk format: directory layout, the JSON manifest (pydantic) and the JSON codec for
non-tensor state. Loading never unpickles: everything that is not raw tensor bytes is JSON.

```
<root>/step-00000120/
    rank-00000.bin ...   raw little-endian tensor bytes, one file per writing rank
    manifest.json        written after every data file is durable
    COMMITTED            empty marker, written after manifest.json is durable
```
"""

from __future__ import annotations

import json
import math
import re
from typing import Any, Literal, Sequence

import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from elastic_ckpt.checkpoint import checksum
from elastic_ckpt.errors import CheckpointCorruptError, NotCheckpointableError

FORMAT_NAME = "elastic_ckpt"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
COMMITTED_FILE = "COMMITTED"
CORRUPT_FILE = "CORRUPT"
"""Written (JSON: reason, time) into a committed checkpoint found corrupt by a load with
``fallback=True``; such a checkpoint is no longer listed or loaded, but kept for inspection."""
_STEP_DIR = re.compile(r"^step-(\d{8,})$")
_RANK_FILE = re.compile(r"^rank-(\d{5,})\.bin$")
_DATA_FILE = re.compile(r"^[A-Za-z0-9_-][A-Za-z0-9_.-]*$")

DTYPES: dict[str, torch.dtype] = {
    name: getattr(torch, name)
    for name in (
        "float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8",
        "uint8", "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2",
    )
    if hasattr(torch, name)
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


def step_dirname(step: int) -> str:
    return f"step-{step:08d}"


def parse_step_dirname(name: str) -> int | None:
    m = _STEP_DIR.match(name)
    return int(m.group(1)) if m else None


def rank_filename(rank: int) -> str:
    return f"rank-{rank:05d}.bin"


def parse_rank_filename(name: str) -> int | None:
    m = _RANK_FILE.match(name)
    return int(m.group(1)) if m else None


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ValueError(f"dtype {dtype} is not supported by the checkpoint format") from None


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class ChunkEntry(_Frozen):
    """One saved chunk of a tensor: where its bytes live and how to check them."""

    offsets: tuple[int, ...]
    """Offset of the chunk in the global tensor, per dim."""
    lengths: tuple[int, ...]
    """Size of the chunk per dim."""
    file: str
    """Data file name inside the checkpoint directory (a bare name, never a path)."""
    byte_offset: int = Field(ge=0)
    """Offset of the chunk's first byte in ``file``."""
    byte_length: int = Field(ge=0)
    """Number of bytes: ``prod(lengths) * itemsize``, row-major, little-endian."""
    rank: int = Field(ge=0)
    """Rank that wrote the chunk."""
    checksums: str
    """base64 of little-endian uint32 crc32c values, one per ``block_size_bytes`` block."""

    @field_validator("file")
    @classmethod
    def _bare_name(cls, v: str) -> str:
        if not _DATA_FILE.match(v) or v in (".", ".."):
            raise ValueError(
                f"data file {v!r} is not a plain file name inside the checkpoint directory "
                "(paths such as '../x' or 'a/b' are refused)"
            )
        return v


class TensorEntry(_Frozen):
    dtype: str
    """torch dtype name, e.g. ``float32``."""
    shape: tuple[int, ...]
    """Global (unsharded) shape."""
    placements: tuple[str, ...] | None = None
    """DTensor placements at save time, e.g. ``("Shard(dim=0)",)``; None for plain tensors."""
    chunks: list[ChunkEntry]

    @field_validator("dtype")
    @classmethod
    def _known_dtype(cls, v: str) -> str:
        if v not in DTYPES:
            raise ValueError(f"unknown dtype {v!r}; known: {sorted(DTYPES)}")
        return v

    @property
    def torch_dtype(self) -> torch.dtype:
        return DTYPES[self.dtype]

    @property
    def itemsize(self) -> int:
        return self.torch_dtype.itemsize

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.itemsize


class Manifest(_Frozen):
    """Everything needed to interpret a checkpoint directory, as plain JSON."""

    format: Literal["elastic_ckpt"] = FORMAT_NAME
    format_version: int
    step: int = Field(ge=0)
    world_size: int = Field(ge=1)
    mesh_shape: tuple[int, ...]
    mesh_dim_names: tuple[str, ...] | None = None
    created_unix_s: float
    versions: dict[str, str]
    checksum_algorithm: Literal["crc32c"] = "crc32c"
    block_size_bytes: int = Field(gt=0)
    tensors: dict[str, TensorEntry]
    """Flattened state-dict key -> tensor entry."""
    objects: dict[str, Any] = {}
    """Flattened state-dict key -> non-tensor leaf, encoded with ``encode_json_value``."""
    flatten_mappings: dict[str, tuple[str | int, ...]] = {}
    """Flattened key -> path in the nested state dict (DCP's planner data)."""
    extra: dict[str, Any] = {}
    """Caller's JSON state saved beside the tensors (data cursor, counters, ...)."""

    @field_validator("format_version")
    @classmethod
    def _supported(cls, v: int) -> int:
        if v > FORMAT_VERSION:
            raise ValueError(
                f"format_version {v} is newer than this elastic_ckpt understands "
                f"({FORMAT_VERSION}); upgrade elastic_ckpt"
            )
        return v

    @model_validator(mode="after")
    def _chunks_consistent(self) -> "Manifest":
        """Every chunk lies inside its tensor, with the right byte length and checksum count,
        and the chunks tile the tensor exactly: the one place this is checked, so every
        reader (load, verify, export) can fill a tensor from its chunks without re-checking."""
        for fqn, t in self.tensors.items():
            for c in t.chunks:
                if len(c.offsets) != len(t.shape) or len(c.lengths) != len(t.shape):
                    raise ValueError(f"tensor {fqn!r}: chunk rank does not match shape {t.shape}")
                if any(o < 0 or o + n > s for o, n, s in zip(c.offsets, c.lengths, t.shape)):
                    raise ValueError(f"tensor {fqn!r}: chunk {c.offsets}+{c.lengths} "
                                     f"outside shape {t.shape}")
                want = math.prod(c.lengths) * t.itemsize
                if c.byte_length != want:
                    raise ValueError(f"tensor {fqn!r}: chunk at {c.offsets} has byte_length "
                                     f"{c.byte_length}, expected {want}")
                blocks = checksum.num_blocks(c.byte_length, self.block_size_bytes)
                if len(c.checksums) != 4 * (-(-4 * blocks // 3)):
                    raise ValueError(f"tensor {fqn!r}: chunk at {c.offsets} has the wrong "
                                     f"number of checksums (expected {blocks} blocks)")
            _check_exact_cover(fqn, t)
        return self

    @property
    def total_bytes(self) -> int:
        return sum(c.byte_length for t in self.tensors.values() for c in t.chunks)

    def to_json(self) -> bytes:
        return self.model_dump_json(indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes, where: str) -> "Manifest":
        """Parse and validate; any problem is a ``CheckpointCorruptError`` naming ``where``."""
        try:
            return cls.model_validate_json(data)
        except ValidationError as exc:
            first = exc.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            raise CheckpointCorruptError(
                f"{where} is not a valid elastic_ckpt manifest: {loc}: {first['msg']}. "
                "The checkpoint cannot be loaded; use an older one (elastic-ckpt ls).",
                file=where, field=loc,
            ) from None


def _check_exact_cover(fqn: str, t: TensorEntry) -> None:
    """The chunks must tile the global shape: a gap would leave part of the destination
    unwritten on load or export (stale values or uninitialized memory, silently), an overlap
    (a box saved twice included) means a forged manifest. With every chunk already known to
    lie inside the shape, total volume equal to the shape's and no two non-empty boxes
    overlapping is exactly that."""
    volume = sum(math.prod(c.lengths) for c in t.chunks)
    if volume != math.prod(t.shape):
        raise ValueError(f"tensor {fqn!r}: chunks cover {volume} of {math.prod(t.shape)} "
                         "elements; the checkpoint is missing data")
    boxes = [(c.offsets, c.lengths) for c in t.chunks if math.prod(c.lengths)]
    for i, (oa, la) in enumerate(boxes):
        for ob, lb in boxes[i + 1:]:
            if all(a < b + m and b < a + n for a, n, b, m in zip(oa, la, ob, lb)):
                raise ValueError(f"tensor {fqn!r}: chunks at {list(oa)} and {list(ob)} overlap")


def is_whole_rows(offsets: Sequence[int], lengths: Sequence[int],
                  shape: Sequence[int]) -> bool:
    """Whether the box ``offsets``/``lengths`` of an array of ``shape`` spans every index of
    every dim but the first, i.e. is one run of whole rows, contiguous in row-major order:
    every FSDP2 ``Shard(0)`` chunk of its tensor, any dim-0 slice of a chunk. A 0-d box (a
    scalar) counts as whole rows."""
    return all(o == 0 for o in offsets[1:]) and tuple(lengths[1:]) == tuple(shape[1:])


# -- JSON codec for non-tensor leaves ------------------------------------------------------
# Tuples and non-string dict keys (optimizer param_groups, schedulers) must come back as they
# went in, and JSON has neither, so they are tagged.
_TUPLE, _DICT, _FLOAT = "__tuple__", "__dict__", "__float__"


def encode_json_value(value: Any, where: str = "value") -> Any:
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        return value if math.isfinite(value) else {_FLOAT: repr(value)}
    if isinstance(value, list):
        return [encode_json_value(v, where) for v in value]
    if isinstance(value, tuple):
        return {_TUPLE: [encode_json_value(v, where) for v in value]}
    if isinstance(value, dict):
        if all(isinstance(k, str) for k in value) and not {_TUPLE, _DICT, _FLOAT} & value.keys():
            return {k: encode_json_value(v, f"{where}.{k}") for k, v in value.items()}
        return {_DICT: [[encode_json_value(k, where), encode_json_value(v, f"{where}.{k}")]
                        for k, v in value.items()]}
    raise NotCheckpointableError(
        f"{where}: {type(value).__name__} is not checkpointable; checkpoints hold tensors and "
        "JSON values (None, bool, int, float, str, list, tuple, dict), and never pickle. "
        "Convert it in state_dict() or keep it out of the checkpoint.", key=where)


def decode_json_value(value: Any) -> Any:
    if isinstance(value, list):
        return [decode_json_value(v) for v in value]
    if isinstance(value, dict):
        if len(value) == 1:
            ((key, inner),) = value.items()
            if key == _TUPLE:
                return tuple(decode_json_value(v) for v in inner)
            if key == _DICT:
                return {decode_json_value(k): decode_json_value(v) for k, v in inner}
            if key == _FLOAT:
                return float(inner)
        return {k: decode_json_value(v) for k, v in value.items()}
    return value


def dumps_value(value: Any, where: str) -> bytes:
    return json.dumps(encode_json_value(value, where), allow_nan=False).encode()


def loads_value(data: bytes) -> Any:
    return decode_json_value(json.loads(data))
