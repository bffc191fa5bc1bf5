"""Export a committed checkpoint as a Hugging Face model directory.

``export_hf(CKPT, OUT)`` writes what ``transformers.AutoModelForCausalLM.from_pretrained(OUT)``
loads as is, in ``save_pretrained``'s layout::

    OUT/model.safetensors                      (all weights <= max_shard_size), or
    OUT/model-00001-of-0000N.safetensors ...   plus
    OUT/model.safetensors.index.json           {"metadata": {"total_size": ...},
                                                "weight_map": {name: file}}
    OUT/config.json                            when the checkpoint recorded the model config

Only the model's tensors are exported: those under ``app.model.`` (``AppState``'s model
state), with that prefix stripped, so names match ``model.state_dict()``. Each shard is
streamed like the plain safetensors export (header from the manifest, one tensor assembled
at a time), so peak memory is the largest tensor.

What the model is comes from the *model record* the trainer saves beside the tensors, the
non-tensor checkpoint entry ``"model"`` (``CheckpointInfo.extra["model"]``)::

    {"class": "LlamaForCausalLM", "config": model.config.to_dict() or None,
     "tied": [["model.embed_tokens.weight", "lm_head.weight"], ...]}

``tied`` groups state-dict names that share one Parameter. DCP saves every name of a group
(the bytes are duplicated in the checkpoint); only the first name of each group is written,
as ``save_pretrained`` does, and the loader re-ties the rest from the config.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from typing import Any

from elastic_ckpt.checkpoint.catalog import open_checkpoint
from elastic_ckpt.checkpoint.export import (
    ExportReport,
    safetensors_header,
    select_tensors,
    write_safetensors,
)
from elastic_ckpt.checkpoint.manifest import Manifest, decode_json_value
from elastic_ckpt.checkpoint.reader import ChunkReader
from elastic_ckpt.errors import CheckpointError, StorageError
from elastic_ckpt.storage import Storage

HF_FORMAT = "hf"
HF_DEFAULT_PREFIX = "app.model."
"""Where ``AppState`` keeps the model's state dict in a checkpoint."""
MODEL_RECORD_KEY = "model"
"""The checkpoint's non-tensor entry holding the model record."""
DEFAULT_MAX_SHARD_SIZE = "5GB"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
CONFIG_FILE = "config.json"
_SHARD_FILE = "model-{:05d}-of-{:05d}.safetensors"
_OWNED_FILE = re.compile(r"^model(-\d{5}-of-\d{5})?\.safetensors$"
                         r"|^model\.safetensors\.index\.json$")
"""Files of an earlier export (or ``save_pretrained``) that ``overwrite`` replaces."""

_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?)\s*([kmgt]i?b|b)?\s*$", re.IGNORECASE)
_UNITS = {"b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40}


@dataclasses.dataclass(frozen=True)
class ModelRecord:
    """The checkpoint's model record (see the module docstring); empty when none was saved."""

    model_class: str | None = None
    config: dict[str, Any] | None = None
    tied: tuple[tuple[str, ...], ...] = ()


@dataclasses.dataclass(frozen=True)
class HFExportReport(ExportReport):
    files: tuple[str, ...]
    """Names written in the output directory: weights, then the index, then config.json."""
    tied_dropped: dict[str, str]
    """Tied name not written -> the name of its group that was written instead."""
    config_written: bool
    notes: tuple[str, ...]
    """What the user must still do for ``from_pretrained`` to work (e.g. supply a config)."""


def parse_size(size: str | int) -> int:
    """Bytes of a shard-size limit given like ``save_pretrained``'s ``max_shard_size``: an int
    or digit string (bytes), or a number with a unit: KB/MB/GB/TB (powers of 1000) or
    KiB/MiB/GiB/TiB (powers of 1024), case-insensitive (``"5GB"``, ``"500MB"``, ``"2GiB"``).
    Raises ``ValueError`` saying what is accepted."""
    if isinstance(size, int) and not isinstance(size, bool):
        value = size
    else:
        m = _SIZE.match(str(size))
        if m is None:
            raise ValueError(f"size {size!r} is not a byte count or a number with a unit; use "
                             "e.g. 5GB, 500MB, 2GiB or 1000000")
        number, unit = m.group(1), _UNITS[(m.group(2) or "b").lower()]
        # Integers stay exact; a fraction ("1.5GB") is rounded down to whole bytes.
        value = int(number) * unit if number.isdigit() else int(float(number) * unit)
    if value <= 0:
        raise ValueError(f"size {size!r} must be at least 1 byte")
    return value


def read_model_record(manifest: Manifest) -> ModelRecord:
    """The model record saved in ``manifest.extra``, checked for shape; an empty record when
    the checkpoint has none. Raises ``CheckpointError`` naming the field that is malformed."""
    raw = decode_json_value(manifest.extra.get(MODEL_RECORD_KEY))
    if raw is None:
        return ModelRecord()
    where = f"the checkpoint's {MODEL_RECORD_KEY!r} entry"
    if not isinstance(raw, dict):
        raise _bad_record(f"{where} is a {type(raw).__name__}, not the model record")
    model_class, config, tied = raw.get("class"), raw.get("config"), raw.get("tied") or ()
    if model_class is not None and not isinstance(model_class, str):
        raise _bad_record(f"{where}: 'class' must be a class name string, got {model_class!r}")
    if config is not None and not isinstance(config, dict):
        raise _bad_record(f"{where}: 'config' must be a dict (model.config.to_dict()) or "
                          f"null, got a {type(config).__name__}")
    if not (isinstance(tied, (list, tuple)) and all(
            isinstance(g, (list, tuple)) and g and all(isinstance(n, str) for n in g)
            for g in tied)):
        raise _bad_record(f"{where}: 'tied' must be a list of lists of state-dict names, "
                          f"got {tied!r}")
    return ModelRecord(model_class=model_class, config=config,
                       tied=tuple(tuple(g) for g in tied))


def _bad_record(what: str) -> CheckpointError:
    return CheckpointError(f"{what}; export --format hf cannot tell the model's config and tied "
                           "weights. Export the weights with --format safetensors instead.",
                           key=MODEL_RECORD_KEY)


def untie(names: dict[str, str], tied: tuple[tuple[str, ...], ...],
          manifest: Manifest) -> tuple[dict[str, str], dict[str, str]]:
    """``(names to write, {name not written: the name of its group written instead})``.
    ``names`` maps exported name -> checkpoint key, in order. Of each tied group only the
    first name is written; if the checkpoint lacks that name but holds another of the group
    (a save that stored the shared Parameter once), that tensor is written under the first
    name. Groups with no name in ``names`` are ignored. Raises ``CheckpointError`` when
    members of a group differ in shape or dtype (the record does not match the tensors)."""
    written_as: dict[str, str] = {}  # the group member whose tensor is written -> its name
    dropped: dict[str, str] = {}
    for group in tied:
        present = [n for n in group if n in names]
        if not present:
            continue
        _check_same_tensor(group[0], present, names, manifest)
        source = group[0] if group[0] in names else present[0]
        written_as[source] = group[0]
        dropped.update({n: group[0] for n in present if n != source})
    kept = {written_as.get(n, n): fqn for n, fqn in names.items() if n not in dropped}
    return kept, {**dropped, **{s: k for s, k in written_as.items() if s != k}}


def _check_same_tensor(first: str, present: list[str], names: dict[str, str],
                       manifest: Manifest) -> None:
    entries = [(n, manifest.tensors[names[n]]) for n in present]
    head_name, head = entries[0]
    for name, entry in entries[1:]:
        if (entry.shape, entry.dtype) != (head.shape, head.dtype):
            raise CheckpointError(
                f"the checkpoint's model record ties {name!r} to {first!r}, but tensor "
                f"{names[name]!r} is {entry.dtype}{list(entry.shape)} and {names[head_name]!r} "
                f"is {head.dtype}{list(head.shape)}; the record does not match the tensors. "
                "Export with --format safetensors to write every tensor.", tensor=names[name])


def plan_shards(sizes: dict[str, int], max_bytes: int) -> list[list[str]]:
    """Names grouped into shards of at most ``max_bytes`` each, in order, filling each shard
    before starting the next; a tensor larger than ``max_bytes`` gets a shard of its own."""
    shards: list[list[str]] = []
    current: list[str] = []
    used = 0
    for name, nbytes in sizes.items():
        if current and used + nbytes > max_bytes:
            shards.append(current)
            current, used = [], 0
        current.append(name)
        used += nbytes
    if current:
        shards.append(current)
    return shards


def shard_filenames(num_shards: int) -> list[str]:
    """``model.safetensors`` for one shard, else ``save_pretrained``'s numbered names."""
    if num_shards == 1:
        return [WEIGHTS_FILE]
    return [_SHARD_FILE.format(i, num_shards) for i in range(1, num_shards + 1)]


def export_hf(checkpoint_uri: str, output_uri: str, prefix: str = HF_DEFAULT_PREFIX, *,
              max_shard_size: str | int = DEFAULT_MAX_SHARD_SIZE, overwrite: bool = False,
              num_threads: int = 4) -> HFExportReport:
    """Write the model of the committed checkpoint at ``checkpoint_uri`` as a Hugging Face
    model directory ``output_uri`` (any path or pyarrow.fs URI; created if missing).

    Tensors under ``prefix`` (stripped), tied duplicates dropped, in safetensors files of at
    most ``max_shard_size`` (``parse_size``) each, with an index when there are several;
    ``config.json`` from the recorded config (``notes`` says so when there is none). Every
    byte read is checksum-verified.

    A non-empty ``output_uri`` is refused unless ``overwrite``, which replaces the weight
    files and index of an earlier export (and config.json, when one is written) and keeps
    every other file there (a tokenizer). Raises like ``export_checkpoint``; ``ValueError``
    for a bad ``max_shard_size``. On failure the files this call wrote are removed (files an
    ``overwrite`` replaced are gone too).
    """
    max_bytes = parse_size(max_shard_size)
    directory, manifest = open_checkpoint(Storage(checkpoint_uri))
    record = read_model_record(manifest)
    selected = select_tensors(manifest, prefix)
    names, dropped = untie(selected, record.tied, manifest)
    shards = plan_shards({n: manifest.tensors[fqn].nbytes for n, fqn in names.items()},
                         max_bytes)
    files = dict(zip(shard_filenames(len(shards)), shards))
    # Every header up front: an unexportable dtype fails before anything is written.
    headers = {f: safetensors_header(manifest, {n: names[n] for n in shard})
               for f, shard in files.items()}
    config = _config_json(record)
    out = _prepare_output(Storage(output_uri), overwrite, config is not None)
    reader = ChunkReader(directory, manifest, check_extents=True)
    written = _write_files(out, reader, files, names, headers, config, num_threads)
    return HFExportReport(
        checkpoint_uri=directory.uri, output_uri=out.uri, step=manifest.step, format=HF_FORMAT,
        num_tensors=len(names),
        total_bytes=sum(manifest.tensors[f].nbytes for f in names.values()),
        num_skipped_tensors=len(manifest.tensors) - len(selected),
        num_objects=len(manifest.objects), files=tuple(written), tied_dropped=dropped,
        config_written=config is not None, notes=_notes(out, config is not None))


def _write_files(out: Storage, reader: ChunkReader, files: dict[str, list[str]],
                 names: dict[str, str], headers: dict[str, bytes], config: bytes | None,
                 num_threads: int) -> list[str]:
    """Write the shards, then the index (several shards), then config.json: the loader
    looks for the index or ``model.safetensors``, so a shard cut short is never referenced.
    Returns the names written; on failure removes them and re-raises."""
    written: list[str] = []
    try:
        for filename, shard in files.items():
            written.append(filename)
            with out.open_write(filename) as stream:
                write_safetensors(stream, reader, {n: names[n] for n in shard},
                                  headers[filename], num_threads=num_threads)
        if len(files) > 1:
            written.append(INDEX_FILE)
            out.write_atomic(INDEX_FILE, _index_json(files, names, reader.manifest))
        if config is not None:
            written.append(CONFIG_FILE)
            out.write_atomic(CONFIG_FILE, config)
    except BaseException:
        for filename in written:
            try:
                out.remove(filename)
            except StorageError:  # the original error is the one to report
                pass
        raise
    return written


def _config_json(record: ModelRecord) -> bytes | None:
    """config.json as ``save_pretrained`` writes it, or None without a recorded config."""
    if record.config is None:
        return None
    config = dict(record.config)
    if not config.get("architectures") and record.model_class:
        # save_pretrained records the class; pipelines and the Hub read it.
        config["architectures"] = [model_class_name(record.model_class)]
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def model_class_name(recorded: str) -> str:
    """The model class name, from the recorded one. ``fully_shard`` swaps a module's class
    for a generated subclass named ``FSDP<Name>``, so ``type(model).__name__`` taken after
    sharding says ``FSDPLlamaForCausalLM``; the class to load is ``LlamaForCausalLM``."""
    return recorded[len("FSDP"):] if recorded.startswith("FSDP") and len(recorded) > 4 \
        else recorded


def _index_json(files: dict[str, list[str]], names: dict[str, str],
                manifest: Manifest) -> bytes:
    entries = [manifest.tensors[fqn] for fqn in names.values()]
    index = {"metadata": {"total_size": sum(e.nbytes for e in entries),
                          "total_parameters": sum(math.prod(e.shape) for e in entries)},
             "weight_map": {n: f for f, shard in files.items() for n in shard}}
    return (json.dumps(index, indent=2, sort_keys=True) + "\n").encode()


def _prepare_output(out: Storage, overwrite: bool, writes_config: bool) -> Storage:
    """Create the output directory, or check an existing one may be written: refused when
    non-empty (unless ``overwrite``, which removes the files the export replaces, so no
    stale shard of an earlier, differently sharded export is left beside the new ones)."""
    if out.exists() and not out.is_dir():
        raise CheckpointError(f"{out.uri} is a file; --format hf writes a directory. Choose "
                              "a directory path", path=out.uri)
    entries = out.listdir()
    if entries and not overwrite:
        shown = ", ".join(name for name, _ in entries[:5]) + (", ..." if len(entries) > 5 else "")
        raise CheckpointError(f"{out.uri} is not empty ({shown}); pass --overwrite to replace "
                              "the model files in it or choose an empty or new directory",
                              path=out.uri)
    for name, is_dir in entries:
        if not is_dir and (_OWNED_FILE.match(name) or (writes_config and name == CONFIG_FILE)):
            out.remove(name)
    out.makedirs()
    return out


def _notes(out: Storage, config_written: bool) -> tuple[str, ...]:
    if config_written:
        return ()
    if out.exists(CONFIG_FILE):
        return (f"the checkpoint records no model config; kept the {CONFIG_FILE} already in "
                f"{out.uri}",)
    return (f"the checkpoint records no model config, so {out.uri} has no {CONFIG_FILE}: "
            f"from_pretrained needs one. Copy the model's {CONFIG_FILE} (the one the training "
            f"model was built from) into {out.uri}",)
