"""How long a checkpoint stops training: elastic_ckpt ``async_save`` vs its sync ``save`` vs
DCP's ``dcp.async_save`` (the anchor), on the same FSDP2 model + AdamW state, same disk, same
run.

```
python benchmarks/async_save.py                     # 0.4 GB and 2 GB of state, W=2, 3 repeats
python benchmarks/async_save.py --gb 0.2 --repeats 1
```

Per size, in one freshly spawned gloo group (W=2, ``fully_shard`` per block + root, one AdamW
step), each repeat runs the three back to back, alternating their order:

* ``raw overwrite``: the ceiling, timed like the others and in the same rotation: each rank
  ``os.write``s its own tensors' bytes over an allocated file of that size, then ``fsync``
  (no format, no checksums, no commit);
* ``save``: ``CheckpointManager.save`` (the caller waits for write, fsync and commit);
* ``async_save``: ``CheckpointManager.async_save`` (returns once the state is staged into
  reused host buffers), then ``handle.result()``;
* ``async_save overlapped``: ``async_save(..., overlap_staging=True)``, then one training step
  of ``--step-tokens`` tokens per rank (default ``STEP_TOKEN_GB`` / GB) whose ``optimizer.step`` waits on
  ``handle.wait_staged()`` (as the trainer does): the sharded parameters and AdamW moments are
  copied during its forward/backward; the stall is the return time plus that wait;
* ``dcp.async_save``: ``dcp.async_save(..., storage_writer=FileSystemWriter(dir),
  async_stager=DefaultStager(StagingOptions(...)))`` with pinned/shared memory off (CPU), then
  ``.result()`` of its future (or of its upload future).

Reported per case: the stall (seconds the caller is blocked, max over ranks, barrier-aligned
start), the time until committed / uploaded, and the stall as a fraction of the sync save.
Each checkpoint goes to a new step directory. Two untimed rounds come first (imports, first
planning, the staging buffers later saves reuse); with ``keep_last=1`` every timed elastic_ckpt
save then overwrites the files retention recycled, while DCP writes a new directory each time
(its older ones removed, untimed). The persist time is durable minus stall (all of a sync
save); ``checkpoint.py`` compares it with the best raw write rate of its run.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import GB, banner, loadavg, markdown_table, run_group  # noqa: E402
from _models import build, local_state_bytes, local_tensors, model_dims, train_step  # noqa: E402,E501

from elastic_ckpt.checkpoint import AppState, CheckpointManager  # noqa: E402
from elastic_ckpt.checkpoint.writer import tensor_bytes  # noqa: E402

CASES = ("raw overwrite", "save", "async_save", "async_save overlapped", "dcp.async_save")
RAW = "raw overwrite"
OVERLAP = "async_save overlapped"
STEP_TOKEN_GB = 205
"""Default tokens per rank of the overlapped case's step: 205 / GB of state (512 at 0.4 GB,
102 at 2 GB; FLOPs scale with parameters x tokens, so a step of ~2 s on the 2-core machine)."""


def _dcp_stager() -> Any:
    from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions  # noqa

    cuda = torch.cuda.is_available()
    return DefaultStager(StagingOptions(use_pinned_memory=cuda, use_shared_memory=False,
                                        use_async_staging=cuda, use_non_blocking_copy=cuda))


def _dcp_wait(response: Any) -> None:
    upload = getattr(response, "upload_completion", None)
    (upload if upload is not None else response).result()


def _one(case: str, app: AppState, root: str, step: int, mgr: CheckpointManager,
         stager: Any, next_step: Any) -> tuple[float, float]:
    """(stall seconds, seconds until durable) of one checkpoint on this rank."""
    dist.barrier()
    t0 = time.perf_counter()
    if case == RAW:
        _raw_overwrite(app, os.path.join(root, f"raw-{dist.get_rank()}.bin"))
        stall = done = time.perf_counter() - t0
    elif case == OVERLAP:
        handle = mgr.async_save(step, {"app": app}, overlap_staging=True)
        returned = time.perf_counter() - t0
        next_step(handle.wait_staged)
        stall = returned + handle.fence.waited_s
        handle.result()
        done = time.perf_counter() - t0
        _OVERLAP_PARTS.append((returned, handle.fence.waited_s, handle.fence.copy_s))
    elif case == "save":
        mgr.save(step, {"app": app})
        stall = done = time.perf_counter() - t0
    elif case == "async_save":
        handle = mgr.async_save(step, {"app": app})
        stall = time.perf_counter() - t0
        handle.result()
        done = time.perf_counter() - t0
    else:
        path = os.path.join(root, "dcp", f"step-{step:08d}")
        response = dcp.async_save({"app": app}, storage_writer=FileSystemWriter(path),
                                  async_stager=stager)
        stall = time.perf_counter() - t0
        _dcp_wait(response)
        done = time.perf_counter() - t0
    dist.barrier()
    return stall, done


_OVERLAP_PARTS: list[tuple[float, float, float]] = []
"""This rank's overlapped saves: (return s, fence wait s, deferred copy s)."""


def _raw_overwrite(app: AppState, path: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        for _, tensor in local_tensors(app):
            view = tensor_bytes(tensor)
            while view:
                view = view[os.write(fd, view):]
        os.fsync(fd)
    finally:
        os.close(fd)


def _drop_old_dcp(case: str, rank: int, root: str, step: int) -> None:
    """DCP keeps everything: remove all but its newest directory (as keep_last=1), untimed."""
    if case == "dcp.async_save" and rank == 0:
        for name in os.listdir(os.path.join(root, "dcp")):
            if name != f"step-{step:08d}":
                shutil.rmtree(os.path.join(root, "dcp", name), ignore_errors=True)


def phase(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    dims = model_dims(cfg["gb"])
    model, optimizer = build(world_size, dims, seed=0)
    train_step(model, optimizer, dims)
    app = AppState(model, optimizer)
    root = cfg["dir"]
    mgrs = {case: CheckpointManager(os.path.join(root, case.replace(".", "_").replace(" ", "_")),
                                    keep_last=1)
            for case in ("save", "async_save", OVERLAP)}

    def next_step(fence: Any) -> None:
        train_step(model, optimizer, dims, tokens=cfg["step_tokens"], before_step=fence)

    for _ in range(2):  # warm-up at the step size the overlapped case computes
        next_step(None)
    dist.barrier()
    t0 = time.perf_counter()
    next_step(None)
    step_s = time.perf_counter() - t0
    stager = _dcp_stager()
    out: dict[str, list[tuple[float, float]]] = {c: [] for c in CASES}
    step = 0
    for _ in range(2):  # warm-up: imports, first planning, staging buffers, and (keep_last=1)
        for case in CASES:  # a recycled file for every timed elastic_ckpt save
            step += 1
            _one(case, app, root, step, mgrs.get(case, mgrs["save"]), stager, next_step)
            _drop_old_dcp(case, rank, root, step)
    _OVERLAP_PARTS.clear()  # the timed ones only
    for r in range(cfg["repeats"]):
        order = CASES if r % 2 == 0 else CASES[::-1]
        for case in order:
            step += 1
            out[case].append(_one(case, app, root, step, mgrs.get(case, mgrs["save"]),
                                  stager, next_step))
            _drop_old_dcp(case, rank, root, step)
    for mgr in mgrs.values():
        mgr.wait()
    return {"runs": out, "state_bytes": local_state_bytes(app), "step_s": step_s,
            "overlap_parts": list(_OVERLAP_PARTS),
            "staging_bytes": mgrs["async_save"].staging_bytes}


HEADERS = ["state", "case", "stall s", "durable s", "stall / sync save", "persist GB/s",
           "persist / raw overwrite", "persist / best raw write"]


def run(sizes: list[float], repeats: int, parent: str | None,
        write_rate: float | None = None, step_tokens: int | None = None) -> list[list[str]]:
    """Every size in its own group; returns the table rows (also used by ``checkpoint.py``,
    which passes the best raw write+fsync rate it measured, bytes/s)."""
    rows = []
    for gb in sizes:
        root = tempfile.mkdtemp(prefix="async-bench-", dir=parent)
        tokens = step_tokens or max(8, round(STEP_TOKEN_GB / gb))
        try:
            results = run_group(2, phase, {"gb": gb, "dir": root, "repeats": repeats,
                                           "step_tokens": tokens})
        finally:
            shutil.rmtree(root, ignore_errors=True)
        state = sum(r["state_bytes"] for r in results)
        staging = max(r["staging_bytes"] for r in results)
        med = {}
        for case in CASES:
            per_repeat = list(zip(*(r["runs"][case] for r in results)))  # repeat -> ranks
            stall = statistics.median(max(s for s, _ in ranks) for ranks in per_repeat)
            done = statistics.median(max(d for _, d in ranks) for ranks in per_repeat)
            # the write, fsync and commit alone (all of a sync save)
            apart = case in ("save", RAW)  # all of it is the persist
            persist = statistics.median(max(d - (0 if apart else s) for s, d in ranks)
                                        for ranks in per_repeat)
            if case == OVERLAP:  # the next step ran meanwhile: the persist is not apart
                persist = float("nan")
            med[case] = (stall, done, persist)
        sync, raw = med["save"][0], med[RAW][2]
        for case in CASES:
            stall, done, persist = med[case]
            rate = state / persist
            apart = not math.isnan(rate)
            rows.append([f"{state / GB:.2f} GB", case, f"{stall:.3f}", f"{done:.3f}",
                         f"{stall / sync:.3f}x", f"{rate / GB:.2f}" if apart else "-",
                         f"{raw / persist:.2f}x" if apart else "-",
                         f"{rate / write_rate:.2f}x" if write_rate and apart else "-"])
        parts = [p for r in results for p in r["overlap_parts"]]
        if parts:
            ret, fence, copy = (statistics.median(p[i] for p in parts) for i in range(3))
            print(f"{gb} GB overlapped, medians over ranks and repeats: async_save returned in "
                  f"{ret:.3f} s, the fence waited {fence:.3f} s, the deferred copies took "
                  f"{copy:.3f} s on the persist thread", flush=True)
        print(f"{gb} GB: a training step of {tokens} tokens per rank takes "
              f"{max(r['step_s'] for r in results):.3f} s without a save; "
              f"staging holds {staging / GB:.2f} GB per rank "
              f"(rank state {max(r['state_bytes'] for r in results) / GB:.2f} GB); "
              f"load avg {loadavg()}", flush=True)
    return rows


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, action="append",
                    help="state size in GB (repeatable; default 0.4 and 2)")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per case (3)")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--step-tokens", type=int, default=None,
                    help=f"tokens per rank of the step the overlapped case runs (default "
                         f"{STEP_TOKEN_GB} / GB of state)")
    args = ap.parse_args(argv)
    banner(__file__, argv, storage=args.dir or tempfile.gettempdir())
    rows = run(args.gb or [0.4, 2.0], args.repeats, args.dir, step_tokens=args.step_tokens)
    print(f"\nW=2, medians of {args.repeats}; load average at end {loadavg()}\n")
    print(markdown_table(HEADERS, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
