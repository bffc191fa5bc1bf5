"""``dist`` tests of the peer-memory tier: snapshots replicated on another node's rank, and a
group that lost ranks restoring the newest snapshot from the survivors' memory, re-sharded,
bit-identical to loading the same step from storage; storage when a rank and its replica
holder are both gone. Units of the pure parts (``choose``, ``replica_holders``, ``Layout``)."""

from __future__ import annotations

import contextlib
import os
from typing import Any, Iterator

import pytest
import torch
import torch.distributed as dist

import ckpt_models as cm
from elastic_ckpt import AppState, CheckpointManager
from elastic_ckpt.checkpoint.memory_tier import (
    Layout,
    MemoryTier,
    Offer,
    choose,
    replica_holders,
)
from elastic_ckpt.train.distributed import RankSpec, process_group
from elastic_ckpt.train.local import free_port, run_ranks

NODES = ["A", "A", "B", "C"]
"""Process -> node. The first group is processes 0-2: 0 and 1 on A, 2 on B, so 2 holds the
replicas of 0 and 1, and 1 holds 2's. Process 3 (node C) joins later, holding nothing."""

CASES = {
    "node B lost": [0, 1],      # 2's chunks come from its replica on 1
    "node A lost": [2, 3],      # 0's and 1's from their replicas on 2, to a newcomer
    "2 and its holder 1 lost": [0, 3],  # 2's chunks are nowhere in memory: storage
}


@contextlib.contextmanager
def _group(rank: int, size: int, port: int) -> Iterator[None]:
    """A group as the runtime forms one (its ``process_group``): process 1 is rank 1 of a
    group of 2, then rank 0 of another, which needs ``forget_earlier_groups``."""
    with process_group(RankSpec(rank, size, "127.0.0.1", port, timeout_s=120)):
        yield


def snapshot_then_lose_ranks(rank: int, world_size: int, root: str) -> dict[str, Any]:
    ports = [free_port() for _ in range(len(CASES) + 2)] if rank == 0 else None
    box = [ports]
    dist.broadcast_object_list(box, src=0)
    ports = box[0]
    dist.destroy_process_group()
    run, ref = os.path.join(root, "run"), os.path.join(root, "ref")
    tier, out = MemoryTier(NODES[rank]), {}
    if rank < 3:
        with _group(rank, 3, ports[0]):
            out.update(_snapshots(tier, run, ref))
    for i, (case, members) in enumerate(CASES.items()):
        if rank in members:
            with _group(members.index(rank), len(members), ports[1 + i]):
                out[case] = _restore(tier, run, ref)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{ports[-1]}", rank=rank,
                            world_size=world_size)  # the launcher's own, for its clean exit
    return out


def _snapshots(tier: MemoryTier, run: str, ref: str) -> dict[str, Any]:
    """Train 4 steps; step 2 is committed to ``run``, steps 2 and 4 snapshotted, and step 4
    saved to ``ref`` as the reference a memory restore must equal."""
    out = {}
    model, opt = cm.build(seed=5)
    mgr = CheckpointManager(run, keep_last=None)
    tier.attach()
    cm.train(model, opt, range(0, 2))
    mgr.save(2, {"app": AppState(model, opt), "extra": {"step": 2}})
    out["expected2"] = cm.full_state(model, opt)
    mgr.snapshot(2, {"app": AppState(model, opt), "extra": {"step": 2}}, tier)
    cm.train(model, opt, range(2, 4))
    stats = mgr.snapshot(4, {"app": AppState(model, opt), "extra": {"step": 4}}, tier)
    out["snapshot"] = (stats.own_bytes, stats.replica_bytes, tier.nbytes, sorted(tier.replicas))
    CheckpointManager(ref).save(4, {"app": AppState(model, opt), "extra": {"step": 4}})
    out["expected4"] = cm.full_state(model, opt)
    return out


def _restore(tier: MemoryTier, run: str, ref: str) -> dict[str, Any]:
    """Restore in a new group (a target with other values and optimizer state), then load
    the same step from storage into another target."""
    model, opt = cm.build(seed=77)
    cm.train(model, opt, range(50, 51))
    extra: dict[str, Any] = {}
    mgr = CheckpointManager(run)
    info = mgr.load({"app": AppState(model, opt), "extra": extra}, memory=tier)
    stats = mgr.last_read_stats
    out = {"step": info.step, "extra": dict(extra), "uri": info.uri,
           "from_memory": mgr.last_from_memory, "world_size": info.world_size,
           "from_peers": stats.bytes_from_peers, "from_storage": stats.bytes_read,
           "state": cm.full_state(model, opt)}
    model, opt = cm.build(seed=78)
    CheckpointManager(ref if info.step == 4 else run).load({"app": AppState(model, opt)})
    out["disk"] = cm.full_state(model, opt)
    return out


@pytest.mark.dist
def test_lost_ranks_restore_from_peer_memory_bit_identical(tmp_path) -> None:
    by_rank = run_ranks(4, snapshot_then_lose_ranks, str(tmp_path), timeout_s=300)
    # Rank 2 (node B) holds the replicas of 0 and 1 (node A); 1 holds 2's; 0 holds none.
    assert [r["snapshot"][3] for r in by_rank[:3]] == [[], [2], [0, 1]]
    own = [r["snapshot"][0] for r in by_rank[:3]]
    assert by_rank[2]["snapshot"][1] == own[0] + own[1] and by_rank[1]["snapshot"][1] == own[2]
    assert by_rank[1]["snapshot"][2] == own[1] + own[2]  # own snapshot + one replica
    expected4 = by_rank[0]["expected4"]
    for case, members in CASES.items():
        records = [by_rank[m][case] for m in members]
        first = records[0]
        if case == "2 and its holder 1 lost":  # storage: the latest committed, step 2
            assert first["step"] == 2 and not first["from_memory"], first["uri"]
            assert sum(r["from_peers"] for r in records) == 0
            assert sum(r["from_storage"] for r in records) > 0
            cm.assert_same(by_rank[0]["expected2"], first["state"], f"{case}: vs saved")
            continue
        assert first["step"] == 4 and first["from_memory"], (case, first["uri"])
        assert first["uri"].startswith("memory:") and first["world_size"] == 3
        assert all(r["extra"] == {"step": 4} for r in records), case
        assert sum(r["from_storage"] for r in records) == 0, case
        assert sum(r["from_peers"] for r in records) > 0, case
        cm.assert_same(expected4, first["state"], f"{case}: memory vs snapshotted")
        cm.assert_same(first["disk"], first["state"], f"{case}: memory vs storage")


def test_replica_holders_are_on_another_node() -> None:
    assert replica_holders(["A", "A", "B"]) == [2, 2, 1]  # B's one rank holds two
    assert replica_holders(["A", "B", "A", "B"]) == [1, 0, 3, 2]  # one each, across nodes
    assert replica_holders(["B", "B", "A", "A", "C", "C"]) == [4, 5, 0, 1, 2, 3]
    assert replica_holders(["A", "A"]) == [1, 0]  # one node: the next rank
    assert replica_holders(["A"]) == [None]


def test_choose_takes_the_newest_snapshot_the_members_cover() -> None:
    old = [Offer("g1", 4, 3, frozenset({0, 2})), Offer("g1", 4, 3, frozenset({1}))]
    assert choose(old).holders == {0: 0, 2: 0, 1: 1} and choose(old).step == 4
    # Member 1's own piece is at step 5 but its replica of 2 is not: step 5 is incomplete.
    torn = [Offer("g1", 5, 3, frozenset({0})), Offer("g1", 5, 3, frozenset({1}))]
    assert choose(torn) is None
    assert choose([None, None]) is None
    newer = old + [Offer("g2", 7, 1, frozenset({0}))]
    chosen = choose(newer)
    assert (chosen.group, chosen.step, chosen.holders, chosen.source) == ("g2", 7, {0: 2}, 2)


def test_layout_aligns_every_chunk_and_views_the_flat_buffer() -> None:
    layout = Layout.of([(("b", (0,)), (3,), torch.float32), (("a", (2, 0)), (1, 3),
                                                             torch.bfloat16)])
    assert [e[0] for e in layout.entries] == [("a", (2, 0)), ("b", (0,))]
    assert [e[3] for e in layout.entries] == [0, 16] and layout.nbytes == 32
    views = layout.views(torch.zeros(layout.nbytes, dtype=torch.uint8))
    assert views[("b", (0,))].shape == (3,) and views[("a", (2, 0))].dtype == torch.bfloat16
