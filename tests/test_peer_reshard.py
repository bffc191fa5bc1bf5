"""``dist`` tests: re-shard from the memory of the processes that wrote a checkpoint
(``save(..., hold=True)`` then ``load(..., held=)`` in a new group of the same processes) is
bit-identical to re-sharding from storage, for growing and shrinking groups."""

from __future__ import annotations

import datetime
import os
from typing import Any

import pytest
import torch.distributed as dist

import ckpt_models as cm
from elastic_ckpt import AppState, CheckpointManager
from elastic_ckpt.train.local import free_port, run_ranks

TRANSITIONS = [(1, 3), (2, 1), (2, 3), (3, 2), (4, 3), (3, 4)]


def _group(rank: int, size: int, port: int) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=size, timeout=datetime.timedelta(seconds=120))


def _target() -> tuple[Any, Any]:
    model, opt = cm.build(seed=999)
    cm.train(model, opt, range(70, 71))  # the target has (different) optimizer state
    return model, opt


def reshard_in_memory(rank: int, world_size: int, root: str) -> list[dict[str, Any]]:
    """Every transition in turn, in the same processes: a group of ``w1`` trains and saves
    holding its shards, then a group of ``w2`` loads once from memory and once from storage."""
    ports = [free_port() for _ in range(2 * len(TRANSITIONS) + 1)] if rank == 0 else None
    box = [ports]
    dist.broadcast_object_list(box, src=0)
    ports = box[0]
    dist.destroy_process_group()
    out = []
    for i, (w1, w2) in enumerate(TRANSITIONS):
        uri = os.path.join(root, f"{w1}to{w2}")
        held, expected = None, None
        if rank < w1:
            _group(rank, w1, ports[2 * i])
            model, opt = cm.build(seed=i)
            cm.train(model, opt, range(0, 2))
            mgr = CheckpointManager(uri, keep_last=None)
            mgr.save(2, {"app": AppState(model, opt), "extra": {"step": 2}}, hold=True)
            held = mgr.held
            expected = cm.full_state(model, opt)
            dist.destroy_process_group()
        record: dict[str, Any] = {"w1": w1, "w2": w2, "expected": expected}
        if rank < w2:
            _group(rank, w2, ports[2 * i + 1])
            model, opt = _target()
            mgr = CheckpointManager(uri)
            info = mgr.load({"app": AppState(model, opt)}, held=held)
            stats = mgr.last_read_stats
            record.update(step=info.step, from_peers=stats.bytes_from_peers,
                          from_storage=stats.bytes_read, memory=cm.full_state(model, opt))
            model, opt = _target()
            mgr.load({"app": AppState(model, opt)})
            record.update(disk=cm.full_state(model, opt),
                          disk_only=mgr.last_read_stats.bytes_from_peers == 0)
            dist.destroy_process_group()
        out.append(record)
    _group(rank, world_size, ports[-1])  # the launcher's own group, for its clean exit
    return out


@pytest.mark.dist
def test_in_memory_reshard_is_bit_identical_to_storage(tmp_path) -> None:
    by_rank = run_ranks(4, reshard_in_memory, str(tmp_path), timeout_s=300)
    for i, (w1, w2) in enumerate(TRANSITIONS):
        where = f"{w1} -> {w2}"
        records = [r[i] for r in by_rank[:w2]]
        first = by_rank[0][i]
        assert first["step"] == 2, where
        cm.assert_same(first["expected"], first["memory"], f"{where}: memory vs saved")
        cm.assert_same(first["disk"], first["memory"], f"{where}: memory vs storage")
        assert all(r["disk_only"] for r in records), where
        peers = sum(r["from_peers"] for r in records)
        storage = sum(r["from_storage"] for r in records)
        assert peers > 0, where
        if w2 >= w1:  # every writer is in the new group: nothing comes from storage
            assert storage == 0, (where, storage)
        else:  # the writers that left: their chunks come from storage
            assert storage > 0, (where, peers)
