"""What the peer-memory tier costs per snapshot, against a training step and a checkpoint
save of the same FSDP2 model + AdamW state, and what a restore from it costs against a
restore from storage, in the same run.

```
python benchmarks/memory_tier.py                 # 0.4 GB of state, W=2, 5 repeats
python benchmarks/memory_tier.py --gb 0.1 --world-size 3 --repeats 3
```

In one freshly spawned gloo group (W ranks, ``fully_shard`` per block + root, AdamW), each
repeat times, barrier-aligned and max over ranks:

* ``step``: one forward/backward/AdamW step of ``--step-tokens`` tokens per rank;
* ``snapshot``: ``CheckpointManager.snapshot`` (plan from the cache, copy this rank's shard
  into its host buffer, share the small objects, send the replica to a rank of another
  "node": each rank is its own node here, so every byte crosses the process group);
* ``save``: ``CheckpointManager.save`` of the same state (sync; write, fsync, commit);
* ``restore from memory``: a group of W-1 ranks (rank W-1 lost) ``load(..., memory=)``s the
  newest snapshot, the lost rank's chunks from its replica, re-sharded to W-1;
* ``restore from storage``: the same group loads the committed checkpoint.

Also printed: host bytes the tier holds per rank against the rank's state (the cost the
README states: its own snapshot and one replica, 2x).
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import banner, fmt_bytes, loadavg, markdown_table, run_group  # noqa: E402
from _models import build, local_state_bytes, model_dims, train_step  # noqa: E402

from elastic_ckpt.checkpoint import AppState, CheckpointManager  # noqa: E402
from elastic_ckpt.checkpoint.memory_tier import MemoryTier  # noqa: E402
from elastic_ckpt.train.distributed import forget_earlier_groups  # noqa: E402


def _timed(fn) -> float:
    dist.barrier()
    t0 = time.perf_counter()
    fn()
    seconds = time.perf_counter() - t0
    box = [None] * dist.get_world_size()
    dist.all_gather_object(box, seconds)
    return max(box)


def bench(rank: int, world_size: int, o: argparse.Namespace, root: str) -> dict[str, Any]:
    dims = model_dims(o.gb)
    model, optimizer = build(world_size, dims, seed=0)
    train_step(model, optimizer, dims, tokens=o.step_tokens)  # creates the AdamW state
    tier = MemoryTier(node=f"node-{rank}")
    tier.attach()
    mgr = CheckpointManager(os.path.join(root, "ckpt"), keep_last=1)
    times: dict[str, list[float]] = {k: [] for k in ("step", "snapshot", "save")}
    parts: dict[str, list[float]] = {"copy": [], "replicate": []}
    step = 1
    for repeat in range(o.repeats + 1):  # the first round is untimed (first planning)
        step += 1
        t_step = _timed(lambda: train_step(model, optimizer, dims, tokens=o.step_tokens))
        state = {"app": AppState(model, optimizer), "trainer": {"step": step}}
        t_snap = _timed(lambda: mgr.snapshot(step, state, tier))
        t_save = _timed(lambda: mgr.save(step, state))
        if repeat:
            for key, value in zip(times, (t_step, t_snap, t_save)):
                times[key].append(value)
            parts["copy"].append(tier.last.copy_s)
            parts["replicate"].append(tier.last.replicate_s)
    state = {"app": AppState(model, optimizer), "trainer": {"step": step + 1}}
    mgr.snapshot(step + 1, state, tier)  # newer than the commit: a restore takes it
    out = {"times": times, "parts": parts,
           "state_bytes": local_state_bytes(AppState(model, optimizer)),
           "tier_bytes": tier.nbytes, "replica_bytes": tier.last.replica_bytes}
    # Rank W-1 is lost: the others form a group of W-1 and restore.
    port = [None]
    if rank == 0:
        from elastic_ckpt.train.local import free_port
        port = [free_port()]
    dist.broadcast_object_list(port, src=0)
    dist.destroy_process_group()
    restores: dict[str, list[float]] = {"restore from memory": [], "restore from storage": []}
    if rank < world_size - 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port[0]}", rank=rank,
                                world_size=world_size - 1)
        forget_earlier_groups()
        model, optimizer = build(world_size - 1, dims, seed=1)
        train_step(model, optimizer, dims, tokens=o.step_tokens)
        target = {"app": AppState(model, optimizer), "trainer": {}}
        loader = CheckpointManager(os.path.join(root, "ckpt"))
        for _ in range(o.repeats):
            restores["restore from memory"].append(
                _timed(lambda: loader.load(target, memory=tier)))
            assert loader.last_from_memory and loader.last_read_stats.bytes_read == 0
            restores["restore from storage"].append(_timed(lambda: loader.load(target)))
            assert not loader.last_from_memory
        dist.destroy_process_group()
    out["restores"] = restores
    # The launcher expects a default group to tear down; a one-rank one does.
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--gb", type=float, default=0.4, help="GB of fp32 params + AdamW state")
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--step-tokens", type=int, default=2048, help="tokens per rank per step")
    p.add_argument("--dir", default=None, help="where the checkpoint goes (default: tmp)")
    o = p.parse_args(argv)
    if o.world_size < 2:
        p.error("--world-size must be >= 2 (a rank is lost for the restore)")
    root = tempfile.mkdtemp(prefix="bench-memory-tier-", dir=o.dir)
    banner(__file__, argv, storage=root)
    try:
        by_rank = run_group(o.world_size, bench, o, root)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    first = by_rank[0]
    med = {k: statistics.median(v) for k, v in first["times"].items()}
    med.update({k: statistics.median(v) for k, v in first["restores"].items()})
    rows = [[k, f"{v:.4f}", f"{v / med['step']:.3f}x", f"{v / med['save']:.3f}x"]
            for k, v in med.items()]
    print(f"\n{o.gb:g} GB of state, W={o.world_size} (restores at W={o.world_size - 1}), "
          f"median of {o.repeats}; load average now {loadavg()}\n")
    print(markdown_table(["", "seconds", "vs step", "vs save"], rows))
    state = sum(r["state_bytes"] for r in by_rank) / len(by_rank)
    tier = sum(r["tier_bytes"] for r in by_rank) / len(by_rank)
    print(f"\nhost memory of the tier per rank: {fmt_bytes(tier)} = {tier / state:.2f}x the "
          f"rank's state ({fmt_bytes(state)}); replica sent per snapshot: "
          f"{fmt_bytes(first['replica_bytes'])}")
    copy, rep = (statistics.median(first["parts"][k]) for k in ("copy", "replicate"))
    print(f"snapshot on rank 0: {copy:.4f} s planning, copy and the objects' all-gather, "
          f"{rep:.4f} s sending and receiving the replica")
    print(f"restore from memory vs storage: "
          f"{med['restore from memory'] / med['restore from storage']:.2f}x")
    print(f"snapshot every step costs {med['snapshot'] / med['step']:.1%} of a "
          f"{med['step']:.3f} s step ({o.step_tokens} tokens/rank); every N steps, 1/N of that")


if __name__ == "__main__":
    main()
