"""Read-only view of a checkpoint root: which steps exist, which are committed, their info."""

from __future__ import annotations

import dataclasses
import json
import time
from typing import Any

from elastic_ckpt.checkpoint.manifest import (
    COMMITTED_FILE,
    CORRUPT_FILE,
    MANIFEST_FILE,
    Manifest,
    decode_json_value,
    parse_step_dirname,
    step_dirname,
)
from elastic_ckpt.checkpoint.reader import read_manifest
from elastic_ckpt.errors import (
    CheckpointCorruptError,
    CheckpointNotCommittedError,
    CheckpointNotFoundError,
    StorageError,
)
from elastic_ckpt.storage import Storage


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """A committed checkpoint, as ``latest()``, ``list()``, ``save()`` and ``load()`` report it."""

    step: int
    uri: str
    world_size: int
    total_bytes: int
    created_unix_s: float
    num_tensors: int
    extra: dict[str, Any]
    """The caller's JSON state saved with the checkpoint (decoded)."""

    @classmethod
    def from_manifest(cls, uri: str, manifest: Manifest) -> "CheckpointInfo":
        return cls(step=manifest.step, uri=uri, world_size=manifest.world_size,
                   total_bytes=manifest.total_bytes, created_unix_s=manifest.created_unix_s,
                   num_tensors=len(manifest.tensors),
                   extra=decode_json_value(manifest.extra))


class Catalog:
    """Lists the ``step-NNNNNNNN`` directories under a root. Never writes."""

    def __init__(self, root: Storage) -> None:
        self.root = root

    def scan(self) -> tuple[list[int], list[int]]:
        """``(committed steps, uncommitted steps)``, each ascending. Committed checkpoints a
        load quarantined as corrupt (``scan_all``'s third list) are in neither."""
        committed, uncommitted, _ = self.scan_all()
        return committed, uncommitted

    def scan_all(self) -> tuple[list[int], list[int], list[int]]:
        """``(committed, uncommitted, quarantined)`` steps, each ascending, in one listing;
        quarantined: committed but marked ``CORRUPT`` by a load that fell back past them."""
        committed, uncommitted, quarantined = [], [], []
        for name, is_dir in self.root.listdir():
            step = parse_step_dirname(name)
            if step is None or not is_dir:
                continue
            if not self.root.exists(f"{name}/{COMMITTED_FILE}"):
                uncommitted.append(step)
            elif self.root.exists(f"{name}/{CORRUPT_FILE}"):
                quarantined.append(step)
            else:
                committed.append(step)
        return sorted(committed), sorted(uncommitted), sorted(quarantined)

    def quarantine(self, step: int, reason: str) -> None:
        """Mark committed checkpoint ``step`` corrupt (its files stay, for inspection)."""
        record = {"reason": reason, "unix_s": time.time()}
        self.directory(step).write_atomic(CORRUPT_FILE, json.dumps(record).encode())

    def directory(self, step: int) -> Storage:
        return self.root.child(step_dirname(step))

    def open(self, step: int) -> tuple[Storage, Manifest]:
        """The directory and validated manifest of a committed checkpoint, or a typed error."""
        return open_checkpoint(self.directory(step))

    def info(self, step: int) -> CheckpointInfo:
        directory, manifest = self.open(step)
        return CheckpointInfo.from_manifest(directory.uri, manifest)


def open_checkpoint(directory: Storage) -> tuple[Storage, Manifest]:
    """Validate that ``directory`` is a committed checkpoint and return its manifest."""
    if not directory.is_dir():
        raise CheckpointNotFoundError(
            f"no checkpoint at {directory.uri}; list the committed ones with "
            "`elastic-ckpt ls <root>`", path=directory.uri)
    if not directory.exists(COMMITTED_FILE):
        has_manifest = directory.exists(MANIFEST_FILE)
        raise CheckpointNotCommittedError(
            f"{directory.uri} has no {COMMITTED_FILE} marker "
            f"({'manifest present' if has_manifest else 'no manifest'}): the save that wrote "
            "it crashed or is still running. It is never loaded; use an earlier checkpoint.",
            path=directory.uri)
    if directory.exists(CORRUPT_FILE):
        raise CheckpointCorruptError(
            f"{directory.uri} was marked corrupt by an earlier load "
            f"({quarantine_reason(directory)}); it is kept only for inspection. If you repaired "
            f"it, delete {directory.uri_of(CORRUPT_FILE)} and run `elastic-ckpt verify` on it.",
            path=directory.uri, file=CORRUPT_FILE)
    manifest = read_manifest(directory)
    named = parse_step_dirname(directory.uri.rstrip("/").rsplit("/", 1)[-1])
    if named is not None and named != manifest.step:
        raise CheckpointCorruptError(
            f"{directory.uri} is named for step {named} but its manifest says step "
            f"{manifest.step}; the directory was renamed or its manifest replaced",
            path=directory.uri, file="manifest.json")
    return directory, manifest


def quarantine_reason(directory: Storage) -> str:
    """Why a load marked ``directory`` CORRUPT (from its marker)."""
    try:
        return str(json.loads(directory.read_bytes(CORRUPT_FILE)).get("reason"))
    except (ValueError, AttributeError, StorageError):
        return "the CORRUPT marker cannot be read"
