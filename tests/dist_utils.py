"""Run a function on several gloo ranks with torch.multiprocessing (used by ``dist`` tests)."""

from __future__ import annotations

import dataclasses
import os
import pickle
import queue as queue_module
import time
import traceback
from typing import Any, Callable, Literal

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from elastic_ckpt.train.local import free_port


@dataclasses.dataclass(frozen=True)
class RankOutcome:
    """How one rank ended. ``value``: fn's return value ("ok"), the error with its traceback
    ("error"), the exit code ("died": exited without reporting) or None ("killed": still
    running when the others had finished or failed, or at the timeout)."""

    rank: int
    status: Literal["ok", "error", "died", "killed"]
    value: Any = None


def _entry(rank: int, world_size: int, port: int, fn: Callable, args: tuple, queue) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=world_size)
        result = fn(rank, world_size, *args)
        # Pickled by value: shared-memory tensor handles die with this process.
        queue.put((rank, "ok", pickle.dumps(result)))
    except BaseException as exc:  # report every failure to the parent, with its traceback
        queue.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def run_rank_outcomes(world_size: int, fn: Callable, *args: Any, timeout_s: float = 240,
                      grace_s: float = 10) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks and report how each
    ended; never hangs. Once one rank fails or dies (e.g. ``os._exit`` in a fault test), the
    others get ``grace_s`` to report and are then killed; all are killed at ``timeout_s``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_entry, args=(r, world_size, port, fn, args, queue))
             for r in range(world_size)]
    for p in procs:
        p.start()
    outcomes: dict[int, RankOutcome] = {}
    exited_at: dict[int, float] = {}
    deadline = time.monotonic() + timeout_s
    failed_at: float | None = None
    try:
        while len(outcomes) < world_size:
            now = time.monotonic()
            if now > deadline or (failed_at is not None and now > failed_at + grace_s):
                break
            try:
                rank, status, payload = queue.get(timeout=0.1)
            except queue_module.Empty:
                for r, p in enumerate(procs):
                    if r in outcomes or p.exitcode is None:
                        continue
                    # A rank that exited may still have its report in flight; wait a moment.
                    if now - exited_at.setdefault(r, now) > 1.0:
                        outcomes[r] = RankOutcome(r, "died", p.exitcode)
                        failed_at = failed_at or now
                continue
            if status == "ok":
                outcomes[rank] = RankOutcome(rank, "ok", pickle.loads(payload))
            else:
                outcomes[rank] = RankOutcome(rank, "error", payload)
                failed_at = failed_at or time.monotonic()
    finally:
        for p in procs:
            p.join(timeout=5 if len(outcomes) == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
        queue.close()
    return [outcomes.get(r, RankOutcome(r, "killed")) for r in range(world_size)]


def run_ranks(world_size: int, fn: Callable, *args: Any, timeout_s: float = 240) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` gloo ranks; return the results
    by rank. ``fn`` must be importable (module level). Raises if any rank fails, dies or is
    still running after ``timeout_s``."""
    outcomes = run_rank_outcomes(world_size, fn, *args, timeout_s=timeout_s, grace_s=5)
    errors = [f"rank {o.rank}: {o.status}: {o.value}" for o in outcomes if o.status != "ok"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [o.value for o in outcomes]
