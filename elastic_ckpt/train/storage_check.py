"""The shared-storage check: a local-path checkpoint root must be one filesystem for the whole
group. Rank 0 writes a token, every rank reads it back; collective over the default group."""

from __future__ import annotations

import socket
import uuid

import torch.distributed as dist

from elastic_ckpt.errors import SharedStorageError, StorageError
from elastic_ckpt.storage import Storage

PROBE_PREFIX = ".elastic_ckpt-shared-check-"


def check_shared_storage(uri: str, node: str) -> None:
    """Raise ``SharedStorageError`` on every rank when some rank cannot read what rank 0 wrote
    under ``uri``. ``node`` names this rank's node; the check runs only for a local path and a
    group that spans more than one node (object stores are shared by construction)."""
    storage = Storage(uri)
    world = dist.get_world_size()
    nodes: list[str] = [""] * world
    dist.all_gather_object(nodes, f"{node} (host {socket.gethostname()})")
    if not storage.is_local or len(set(nodes)) <= 1:
        return
    token = [uuid.uuid4().hex if dist.get_rank() == 0 else ""]
    dist.broadcast_object_list(token, src=0)
    name = PROBE_PREFIX + token[0]
    written = ""
    if dist.get_rank() == 0:
        try:
            storage.makedirs()
            storage.write_atomic(name, token[0].encode())
        except StorageError as exc:
            written = str(exc)
    dist.barrier()
    try:
        seen = storage.read_bytes(name).decode() == token[0]
    except (StorageError, UnicodeDecodeError):
        seen = False
    seen_by: list[bool] = [False] * world
    dist.all_gather_object(seen_by, seen)
    if dist.get_rank() == 0:
        try:
            storage.remove(name)
        except StorageError:
            pass
    blind = sorted({nodes[r] for r in range(world) if not seen_by[r]})
    if written or blind:
        raise SharedStorageError(
            f"checkpoint.uri {uri} is a local path but not one filesystem across the group's "
            f"nodes: a file rank 0 (node {nodes[0]}) wrote there "
            + (f"could not be written ({written})" if written else
               f"is not visible on node(s) {', '.join(blind)}")
            + ". Every rank must see the same checkpoints: use shared storage mounted at the "
            "same path on every node (NFS, Lustre, a mounted bucket) or an object store "
            "(s3://, gs://).", uri=uri, nodes=blind)
