"""What the CLI shows: checkpoints as JSON-able dicts (``--json``) and as text.

Each ``*_view`` builds the dict (the stable, machine-readable form); each ``format_*`` renders
that same dict for people, so the two outputs never disagree.
"""

from __future__ import annotations

import datetime
import json
from typing import Any

from elastic_ckpt.checkpoint.catalog import Catalog, quarantine_reason
from elastic_ckpt.checkpoint.manifest import (
    MANIFEST_FILE,
    ChunkEntry,
    Manifest,
    TensorEntry,
    is_whole_rows,
)
from elastic_ckpt.errors import CheckpointError
from elastic_ckpt.storage import Storage


# -- ls ----------------------------------------------------------------------------------------
def ls_view(root: Storage) -> dict[str, Any]:
    """Every ``step-*`` directory under ``root``, ascending by step: committed checkpoints
    with their info, committed ones whose manifest cannot be read, and uncommitted debris."""
    catalog = Catalog(root)
    committed, uncommitted, quarantined = catalog.scan_all()
    entries: list[dict[str, Any]] = []
    for step in committed:
        uri = catalog.directory(step).uri
        try:
            info = catalog.info(step)
        except CheckpointError as exc:
            entries.append({"step": step, "status": "unreadable", "uri": uri,
                            "error": str(exc)})
            continue
        entries.append({"step": step, "status": "committed", "uri": uri,
                        "world_size": info.world_size, "total_bytes": info.total_bytes,
                        "num_tensors": info.num_tensors, "created_unix_s": info.created_unix_s,
                        "created": iso_time(info.created_unix_s)})
    for step in quarantined:
        directory = catalog.directory(step)
        entries.append({"step": step, "status": "corrupt", "uri": directory.uri,
                        "bytes_on_disk": _bytes_on_disk(directory),
                        "error": quarantine_reason(directory)})
    for step in uncommitted:
        directory = catalog.directory(step)
        entries.append({"step": step, "status": "uncommitted", "uri": directory.uri,
                        "bytes_on_disk": _bytes_on_disk(directory),
                        "has_manifest": directory.exists(MANIFEST_FILE)})
    entries.sort(key=lambda e: e["step"])
    return {"root": root.uri, "checkpoints": entries}


def _bytes_on_disk(directory: Storage) -> int:
    return sum(directory.size(name) or 0 for name, is_dir in directory.listdir() if not is_dir)


def format_ls(view: dict[str, Any]) -> str:
    entries = view["checkpoints"]
    if not entries:
        return f"no checkpoints under {view['root']}"
    rows = [("STEP", "STATUS", "WORLD", "SIZE", "TENSORS", "CREATED", "URI")]
    for e in entries:
        if e["status"] == "committed":
            rows.append((str(e["step"]), "committed", str(e["world_size"]),
                         human_bytes(e["total_bytes"]), str(e["num_tensors"]), e["created"],
                         e["uri"]))
        elif e["status"] == "uncommitted":
            rows.append((str(e["step"]), "UNCOMMITTED", "-", human_bytes(e["bytes_on_disk"]),
                         "-", "-", e["uri"]))
        elif e["status"] == "corrupt":
            rows.append((str(e["step"]), "CORRUPT", "-", human_bytes(e["bytes_on_disk"]),
                         "-", "-", e["uri"]))
        else:
            rows.append((str(e["step"]), "UNREADABLE", "-", "-", "-", "-", e["uri"]))
    lines = [f"checkpoints under {view['root']} (oldest first)", table(rows, right={0, 2, 4})]
    n_debris = sum(e["status"] == "uncommitted" for e in entries)
    if n_debris:
        lines.append(f"{n_debris} UNCOMMITTED director{'y' if n_debris == 1 else 'ies'}: a "
                     "crashed save or one still running; never loaded, and removed by "
                     "retention once older than the newest committed checkpoint.")
    for e in entries:
        if e["status"] == "unreadable":
            lines.append(f"step {e['step']} is UNREADABLE: {e['error']}")
        elif e["status"] == "corrupt":
            lines.append(f"step {e['step']} was marked CORRUPT by a load that fell back past "
                         f"it (never loaded again; kept for inspection): {e['error']}")
    return "\n".join(lines)


# -- inspect -----------------------------------------------------------------------------------
def inspect_view(uri: str, manifest: Manifest) -> dict[str, Any]:
    files = sorted({c.file for t in manifest.tensors.values() for c in t.chunks})
    return {
        "uri": uri,
        "step": manifest.step,
        "world_size": manifest.world_size,
        "mesh_shape": list(manifest.mesh_shape),
        "mesh_dim_names": (list(manifest.mesh_dim_names)
                           if manifest.mesh_dim_names is not None else None),
        "format": manifest.format,
        "format_version": manifest.format_version,
        "versions": dict(manifest.versions),
        "created_unix_s": manifest.created_unix_s,
        "created": iso_time(manifest.created_unix_s),
        "checksum_algorithm": manifest.checksum_algorithm,
        "block_size_bytes": manifest.block_size_bytes,
        "total_bytes": manifest.total_bytes,
        "num_tensors": len(manifest.tensors),
        "num_chunks": sum(len(t.chunks) for t in manifest.tensors.values()),
        "files": files,
        "tensors": [_tensor_view(fqn, t) for fqn, t in manifest.tensors.items()],
        "num_objects": len(manifest.objects),
        "objects": dict(manifest.objects),
        "extra": dict(manifest.extra),
    }


def _tensor_view(fqn: str, entry: TensorEntry) -> dict[str, Any]:
    chunks = sorted(entry.chunks, key=lambda c: (c.rank, tuple(c.offsets)))
    return {
        "name": fqn,
        "dtype": entry.dtype,
        "shape": list(entry.shape),
        "placements": list(entry.placements) if entry.placements is not None else None,
        "nbytes": entry.nbytes,
        "chunks": [_chunk_view(entry, c) for c in chunks],
    }


def _chunk_view(entry: TensorEntry, c: ChunkEntry) -> dict[str, Any]:
    # A scalar is shown as "whole tensor", not as rows.
    whole_rows = bool(entry.shape) and is_whole_rows(c.offsets, c.lengths, entry.shape)
    return {
        "rank": c.rank,
        "offsets": list(c.offsets),
        "lengths": list(c.lengths),
        "rows": [c.offsets[0], c.offsets[0] + c.lengths[0]] if whole_rows else None,
        "box": [[o, o + n] for o, n in zip(c.offsets, c.lengths)],
        "file": c.file,
        "byte_offset": c.byte_offset,
        "byte_length": c.byte_length,
    }


def describe_chunk(chunk: dict[str, Any]) -> str:
    """``rows [0, 19)`` for a run of whole rows, ``box [0:8, 4:8]`` otherwise,
    ``whole tensor`` for a scalar."""
    if chunk["rows"] is not None:
        return f"rows [{chunk['rows'][0]}, {chunk['rows'][1]})"
    if not chunk["box"]:
        return "whole tensor"
    return "box [" + ", ".join(f"{a}:{b}" for a, b in chunk["box"]) + "]"


def format_inspect(view: dict[str, Any]) -> str:
    mesh = "x".join(str(n) for n in view["mesh_shape"])
    if view["mesh_dim_names"]:
        mesh += f" ({', '.join(view['mesh_dim_names'])})"
    versions = ", ".join(f"{k} {v}" for k, v in sorted(view["versions"].items()))
    header = table([
        ("checkpoint", view["uri"]),
        ("step", str(view["step"])),
        ("world size", str(view["world_size"])),
        ("mesh", mesh),
        ("format", f"{view['format']} v{view['format_version']}"),
        ("versions", versions),
        ("created", view["created"]),
        ("total", f"{human_bytes(view['total_bytes'])} ({view['total_bytes']} bytes) in "
                  f"{view['num_tensors']} tensors, {view['num_chunks']} chunks, "
                  f"{len(view['files'])} files"),
        ("checksums", f"{view['checksum_algorithm']}, "
                      f"{human_bytes(view['block_size_bytes'])} blocks"),
    ])
    lines = [header, "", f"tensors ({view['num_tensors']}):"]
    for t in view["tensors"]:
        placements = ", ".join(t["placements"]) if t["placements"] else "plain tensor"
        lines.append(f"  {t['name']}  {t['dtype']}{t['shape']}  {placements}  "
                     f"{human_bytes(t['nbytes'])}")
        for c in t["chunks"]:
            lines.append(f"    rank {c['rank']}: {describe_chunk(c)}  "
                         f"({human_bytes(c['byte_length'])} in {c['file']} "
                         f"@ {c['byte_offset']})")
    lines.append("")
    lines.append(f"objects (non-tensor leaves): {view['num_objects']}")
    lines.append("extra: " + json.dumps(view["extra"], indent=2, sort_keys=True))
    return "\n".join(lines)


# -- small formatting helpers ------------------------------------------------------------------
def human_bytes(n: int) -> str:
    if n < 1024:
        return f"{n} B"
    value = float(n)
    for unit in ("KiB", "MiB", "GiB", "TiB", "PiB"):
        value /= 1024
        if value < 1024 or unit == "PiB":
            return f"{value:.1f} {unit}"
    raise AssertionError("unreachable")


def iso_time(unix_s: float) -> str:
    """Local time with its UTC offset, to the second."""
    return datetime.datetime.fromtimestamp(unix_s).astimezone().isoformat(timespec="seconds")


def table(rows: list[tuple[str, ...]], right: set[int] = frozenset()) -> str:
    """Columns padded to their widest cell; ``right`` holds right-aligned column indexes.
    The last column is not padded."""
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    out = []
    for r in rows:
        cells = [cell.rjust(w) if i in right else cell.ljust(w)
                 for i, (cell, w) in enumerate(zip(r, widths))]
        cells[-1] = r[-1] if len(r) - 1 not in right else cells[-1]
        out.append("  ".join(cells).rstrip())
    return "\n".join(out)
