"""Read-only view of a checkpoint root: which steps exist, which are committed, their info."""

from __future__ import annotations

import dataclasses
from typing import Any

from elastic_ckpt.checkpoint.manifest import (
    COMMITTED_FILE,
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
        """``(committed steps, uncommitted steps)``, each ascending."""
        committed, uncommitted = [], []
        for name, is_dir in self.root.listdir():
            step = parse_step_dirname(name)
            if step is None or not is_dir:
                continue
            marker = f"{name}/{COMMITTED_FILE}"
            (committed if self.root.exists(marker) else uncommitted).append(step)
        return committed, uncommitted

    def latest_step(self) -> int | None:
        committed, _ = self.scan()
        return committed[-1] if committed else None

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
    manifest = read_manifest(directory)
    named = parse_step_dirname(directory.uri.rstrip("/").rsplit("/", 1)[-1])
    if named is not None and named != manifest.step:
        raise CheckpointCorruptError(
            f"{directory.uri} is named for step {named} but its manifest says step "
            f"{manifest.step}; the directory was renamed or its manifest replaced",
            path=directory.uri, file="manifest.json")
    return directory, manifest
