"""Row-ranged reads of pretrained weights from any ``pyarrow.fs`` URI ("pretrained start").

Each rank of an FSDP2 model (parameters sharded along dim 0) reads only the rows of its own
shard of each tensor: ``open_weights(uri).read_rows(name, start, stop)``, never the whole
model. What ``open_weights`` accepts, detected from the URI:

- a ``.safetensors`` file, or an HF model directory with ``model.safetensors`` or
  ``model.safetensors.index.json`` (its ``weight_map``): the header is parsed over ranged
  reads and exactly the bytes of the requested rows are read into a fresh tensor;
- a torch state-dict file (``.pt``, ``.pth``, ``.bin``), or an HF directory with
  ``pytorch_model.bin`` or ``pytorch_model.bin.index.json``: ``torch.load(weights_only=True,
  mmap=True)``, so only the pages of the rows asked for are read. A file on a non-local URI
  is first copied whole to a local temporary file (deleted on ``close``);
- an elastic_ckpt checkpoint: a committed ``step-N`` directory, or a checkpoint root (its
  latest committed step). Its model part (keys under ``app.model.``, prefix stripped) is read
  with checksum-verified ranged reads of just the chunks that overlap the rows.

Nothing here is collective or needs ``torch.distributed``; nothing is unpickled beyond what
``torch.load(weights_only=True)`` allows. Byte order: little-endian hosts only, as the
checkpoint format.

This module detects the format and reads checkpoints and shard indexes; single files are in
``weight_files`` (safetensors parsing in ``safetensors_format``), the interface in
``weight_source``.
"""

from __future__ import annotations

import json
import math
import os
from contextlib import ExitStack

from elastic_ckpt.checkpoint.catalog import Catalog, open_checkpoint
from elastic_ckpt.checkpoint.export import normalize_prefix, select_tensors
from elastic_ckpt.checkpoint.manifest import (
    COMMITTED_FILE,
    MANIFEST_FILE,
    Manifest,
    is_whole_rows,
)
from elastic_ckpt.checkpoint.reader import ChunkReader
from elastic_ckpt.checkpoint.weight_files import SafetensorsFile, TorchFile
from elastic_ckpt.checkpoint.weight_source import TensorInfo, WeightSource
from elastic_ckpt.errors import CheckpointError, WeightsCorruptError, WeightsError
from elastic_ckpt.storage import Storage

__all__ = ["TensorInfo", "WeightSource", "open_weights"]

SAFETENSORS_FILE = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
TORCH_FILE = "pytorch_model.bin"
TORCH_INDEX = "pytorch_model.bin.index.json"
HF_FILES = (SAFETENSORS_FILE, SAFETENSORS_INDEX, TORCH_FILE, TORCH_INDEX)
"""What an HF model directory is searched for, in this order (transformers' preference)."""
TORCH_SUFFIXES = (".pt", ".pth", ".bin")
MODEL_PREFIX = "app.model."
"""Key prefix of the model's tensors in checkpoints saved with ``{"app": AppState(...)}``."""


# -- opening ---------------------------------------------------------------------------------
def open_weights(uri: str, *, checkpoint_prefix: str = MODEL_PREFIX) -> WeightSource:
    """Open the pretrained weights at ``uri`` (any ``pyarrow.fs`` URI or local path) for
    row-ranged reads; see the module docstring for what is accepted. Not collective.

    Reads only headers and indexes here (and a torch file's pickle, which holds no tensor
    data; a non-local torch file is first copied to a local temporary file). For a
    checkpoint, ``checkpoint_prefix`` selects the tensors (stripped from their names).
    Raises ``WeightsError`` when nothing usable is at ``uri`` (listing what was looked for),
    ``WeightsCorruptError`` for a malformed file, ``StorageError`` when storage fails, and the
    ``CheckpointError`` family for an uncommitted or corrupt checkpoint.
    """
    storage = Storage(uri)
    if storage.is_dir():
        return _open_directory(storage, checkpoint_prefix)
    if storage.exists():
        parent, name = _split_uri(uri)
        return _open_file(Storage(parent), name)
    raise WeightsError(f"nothing at {uri}: expected a weights file or a model or checkpoint "
                       "directory. Check the path.", path=uri)


def _open_directory(storage: Storage, prefix: str) -> WeightSource:
    entries = dict(storage.listdir())
    if COMMITTED_FILE in entries or MANIFEST_FILE in entries:
        return _open_checkpoint(storage, prefix)
    for name in HF_FILES:
        if entries.get(name) is False:
            return _open_file(storage, name)
    committed, uncommitted, quarantined = Catalog(storage).scan_all()
    if committed:
        return _open_checkpoint(Catalog(storage).directory(committed[-1]), prefix)
    if uncommitted or quarantined:
        raise WeightsError(
            f"{storage.uri} is a checkpoint root with no committed step (without a COMMITTED "
            f"marker: {uncommitted or 'none'}; marked CORRUPT: {quarantined or 'none'}). "
            "Pass a step directory that is committed, or another root.", path=storage.uri)
    found = sorted(entries)
    shown = ", ".join(found[:10]) + (f" ... ({len(found) - 10} more)" if len(found) > 10 else "")
    raise WeightsError(
        f"no weights in {storage.uri}: looked for {', '.join(HF_FILES)}, an elastic_ckpt "
        f"checkpoint ({MANIFEST_FILE} + {COMMITTED_FILE}) and a checkpoint root (step-NNNNNNNN "
        f"directories). It holds: {shown or 'nothing'}. If the weights file has another "
        "name, pass the file itself.", path=storage.uri)


def _open_file(parent: Storage, name: str) -> WeightSource:
    """A weights file in ``parent``, by its suffix."""
    if name.endswith(".index.json"):
        return _open_index(parent, name)
    if name.endswith(".safetensors"):
        return SafetensorsFile(parent.child(name))
    if name.endswith(TORCH_SUFFIXES):
        return TorchFile(parent.child(name))
    raise WeightsError(
        f"cannot tell the format of {parent.uri_of(name)}: expected a .safetensors file, a "
        f"torch file ({', '.join(TORCH_SUFFIXES)}), an *.index.json shard index, or a model "
        "or checkpoint directory", path=parent.uri_of(name))


def _open_checkpoint(directory: Storage, prefix: str) -> WeightSource:
    directory, manifest = open_checkpoint(directory)
    try:
        names = select_tensors(manifest, prefix)
    except CheckpointError as exc:
        raise WeightsError(
            f"{directory.uri}: {exc}. open_weights reads the model part of a checkpoint saved "
            f"as {{'app': AppState(model, ...)}}; pass checkpoint_prefix= for another layout.",
            path=directory.uri, prefix=normalize_prefix(prefix)) from None
    return _CheckpointSource(directory, manifest, names)


def _split_uri(uri: str) -> tuple[str, str]:
    """``(parent URI, file name)``; a URI's query string (``?endpoint_override=...``) stays
    on the parent, so children opened from it reach the same endpoint."""
    if "://" not in uri:
        path = os.path.abspath(uri)
        return os.path.dirname(path), os.path.basename(path)
    base, sep, query = uri.partition("?")
    parent, _, name = base.rstrip("/").rpartition("/")
    return f"{parent}{sep}{query}", name


# -- sharded (index.json) --------------------------------------------------------------------
def _open_index(parent: Storage, name: str) -> WeightSource:
    where = parent.uri_of(name)
    weight_map = _read_weight_map(parent, name)
    with ExitStack() as stack:  # a failure closes the shards opened so far
        shards: dict[str, WeightSource] = {}
        for file in sorted(set(weight_map.values())):
            if not parent.exists(file):
                raise WeightsCorruptError(
                    f"{where} maps tensors to {file}, which is missing from "
                    f"{parent.uri}. Re-download the model.", file=where)
            shards[file] = _open_file(parent, file)
            stack.callback(shards[file].close)
        source = _ShardedSource(where, weight_map, shards)
        stack.pop_all()
    return source


def _read_weight_map(parent: Storage, name: str) -> dict[str, str]:
    where = parent.uri_of(name)
    try:
        index = json.loads(parent.read_bytes(name))
    except ValueError as exc:
        raise WeightsCorruptError(f"{where} is not valid JSON ({exc}). Re-download it.",
                                  file=where) from None
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not (isinstance(weight_map, dict) and weight_map
            and all(isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items())):
        raise WeightsCorruptError(f"{where} has no 'weight_map' object of tensor name -> file "
                                  "name. Re-download it.", file=where)
    for file in set(weight_map.values()):
        parts = file.split("/")
        if file.startswith("/") or "://" in file or ".." in parts or "" in parts:
            raise WeightsCorruptError(f"{where} maps tensors to {file!r}, which is not a file "
                                      "name inside its directory", file=where)
    return weight_map


class _ShardedSource(WeightSource):
    """Several weight files behind one ``weight_map``; each read goes to its file's source."""

    def __init__(self, uri: str, weight_map: dict[str, str],
                 shards: dict[str, WeightSource]) -> None:
        tensors = {}
        for name, file in weight_map.items():
            found = shards[file]._tensors.get(name)
            if found is None:
                raise WeightsCorruptError(
                    f"{uri} maps tensor {name!r} to {file}, but that file has no such tensor; "
                    "the index and its shards do not match. Re-download them.",
                    file=uri, tensor=name)
            tensors[name] = found
        formats = {s.format for s in shards.values()}
        super().__init__(uri, formats.pop() if len(formats) == 1 else "mixed", tensors)
        self._owner = {name: shards[file] for name, file in weight_map.items()}
        self._shards = shards

    def _read_into(self, name, info, start, stop, out) -> int:
        return self._owner[name]._read_into(name, info, start, stop, out)

    def _close(self) -> None:
        for shard in self._shards.values():
            shard.close()


# -- elastic_ckpt checkpoints ----------------------------------------------------------------
class _CheckpointSource(WeightSource):
    """The model part of a committed checkpoint. A read goes to the chunks that overlap the
    rows: a chunk of whole rows (every FSDP2 ``Shard(0)`` chunk) is read straight into the
    output; any other chunk's overlapping rows are read and copied into their box."""

    def __init__(self, directory: Storage, manifest: Manifest, names: dict[str, str]) -> None:
        self.step = manifest.step
        self._manifest, self._keys = manifest, names
        self._reader = ChunkReader(directory, manifest)
        super().__init__(directory.uri, "elastic_ckpt", {
            name: TensorInfo(tuple(manifest.tensors[key].shape),
                             manifest.tensors[key].torch_dtype, directory.uri)
            for name, key in names.items()})

    def _read_into(self, name, info, start, stop, out) -> int:
        key = self._keys[name]
        entry = self._manifest.tensors[key]
        if not entry.shape:  # a scalar: one chunk, the whole tensor
            return self._reader.read_rows(key, entry, entry.chunks[0], 0, 0, out=out)[1]
        nread = 0
        # The manifest validator guarantees the chunks tile the tensor exactly once, so every
        # element of ``out`` is written by exactly one chunk below.
        for chunk in entry.chunks:
            lo, hi = max(start, chunk.offsets[0]), min(stop, chunk.offsets[0] + chunk.lengths[0])
            if lo >= hi or not math.prod(chunk.lengths):
                continue
            dest = out.narrow(0, lo - start, hi - lo)  # contiguous: a dim-0 slice
            row0 = lo - chunk.offsets[0]
            if is_whole_rows(chunk.offsets, chunk.lengths, entry.shape):
                nread += self._reader.read_rows(key, entry, chunk, row0, hi - lo, out=dest)[1]
                continue
            piece, n = self._reader.read_rows(key, entry, chunk, row0, hi - lo)
            for dim in range(1, len(entry.shape)):
                dest = dest.narrow(dim, chunk.offsets[dim], chunk.lengths[dim])
            dest.copy_(piece)
            nread += n
        return nread
