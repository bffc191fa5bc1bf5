"""Run a group of ranks on this machine with ``torch.multiprocessing`` (no Ray).

For demos, GPU checks (one rank per GPU), tests and benchmarks. ``run_local_group`` trains a
``TrainJob`` (rank 0's step metrics and events stream back to the parent through a queue, so
progress can be shown while the group trains); ``spawn_ranks`` / ``run_ranks`` run any
function on every rank of a fresh process group and collect what each returned.
"""

from __future__ import annotations

import dataclasses
import pickle
import queue as queue_mod
import socket
import time
import traceback
from typing import Any, Callable, Literal

import torch
import torch.multiprocessing as mp

from elastic_ckpt.train.distributed import RankSpec, process_group
from elastic_ckpt.train.events import RankEvent
from elastic_ckpt.train.loop import RankHooks, RankResult, StepMetrics, TrainJob


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_local_group(job: TrainJob, world_size: int,
                    on_step: Callable[[StepMetrics], None] = lambda m: None,
                    on_event: Callable[[RankEvent], None] = lambda event: None,
                    use_gpu: bool = False, stop_after_steps: int | None = None) -> RankResult:
    """Train ``job`` on ``world_size`` local ranks; returns rank 0's result. With
    ``stop_after_steps`` the group stops (with a checkpoint) after that many steps. Raises
    ``RuntimeError`` with the failing rank's traceback if any rank fails (the others are
    killed, not left waiting on a collective)."""
    ctx = mp.get_context("spawn")
    events = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_rank_main, args=(job, stop_after_steps, RankSpec(
        rank=r, world_size=world_size, master_addr="127.0.0.1", master_port=port,
        use_gpu=use_gpu, local_device=r if use_gpu else 0), events), daemon=True)
        for r in range(world_size)]
    for p in procs:
        p.start()
    result: RankResult | None = None
    done = 0
    try:
        while done < world_size:
            try:
                kind, payload = events.get(timeout=1.0)
            except queue_mod.Empty:
                dead = [p for p in procs if p.exitcode not in (None, 0)]
                if dead:
                    raise RuntimeError(f"rank process {procs.index(dead[0])} died with exit "
                                       f"code {dead[0].exitcode}") from None
                continue
            if kind == "step":
                on_step(payload)
            elif kind == "event":
                on_event(payload)
            elif kind == "done":
                rank, res = payload
                result = pickle.loads(res) if rank == 0 else result
                done += 1
            elif kind == "error":
                raise RuntimeError(payload)
    finally:
        for p in procs:
            p.join(timeout=10 if done == world_size else 0.1)
            if p.is_alive():
                p.kill()
                p.join()
    assert result is not None
    return result


def _rank_main(job: TrainJob, stop_after: int | None, spec: RankSpec, events) -> None:
    torch.set_num_threads(max(1, torch.get_num_threads() // spec.world_size))
    try:
        with process_group(spec):
            steps = [0]

            def on_step(m: StepMetrics) -> None:
                steps[0] += 1
                if spec.rank == 0:
                    events.put(("step", m))

            def should_stop() -> bool:
                return stop_after is not None and steps[0] + 1 >= stop_after

            hooks = RankHooks(should_stop=should_stop, on_step=on_step,
                              on_event=lambda e: spec.rank == 0 and events.put(("event", e)))
            result = job.trainer(hooks, spec.device).run()
        events.put(("done", (spec.rank, pickle.dumps(result))))
    except BaseException as exc:  # report to the parent, which tears the group down
        events.put(("error", f"rank {spec.rank}: {type(exc).__name__}: {exc}\n"
                             f"{traceback.format_exc()}"))


# -- any function on N ranks ---------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class RankOutcome:
    """How one rank of ``spawn_ranks`` ended. ``value``: fn's return value ("ok"), the error
    with its traceback ("error"), the exit code ("died": exited without reporting) or None
    ("killed": still running when the others had finished or failed, or at the timeout)."""

    rank: int
    status: Literal["ok", "error", "died", "killed"]
    value: Any = None


def spawn_ranks(world_size: int, fn: Callable, *args: Any, use_gpu: bool = False,
                threads_per_rank: int = 1, timeout_s: float = 240,
                grace_s: float = 10) -> list[RankOutcome]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh spawned processes, each in
    one default process group (gloo, or nccl with one GPU per rank), and report how each
    ended; never hangs. ``fn`` must be importable (module level) and its result picklable.
    Once one rank fails or dies, the others get ``grace_s`` to report and are then killed;
    all are killed at ``timeout_s``."""
    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    port = free_port()
    procs = [ctx.Process(target=_fn_main, args=(RankSpec(
        rank=r, world_size=world_size, master_addr="127.0.0.1", master_port=port,
        use_gpu=use_gpu, local_device=r if use_gpu else 0), threads_per_rank, fn, args, queue))
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
            except queue_mod.Empty:
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


def run_ranks(world_size: int, fn: Callable, *args: Any, use_gpu: bool = False,
              threads_per_rank: int = 1, timeout_s: float = 240) -> list[Any]:
    """``spawn_ranks`` that returns the results by rank, or raises ``RuntimeError`` with
    every failing rank's traceback (or how it died, or that it timed out)."""
    outcomes = spawn_ranks(world_size, fn, *args, use_gpu=use_gpu,
                           threads_per_rank=threads_per_rank, timeout_s=timeout_s, grace_s=5)
    errors = [f"rank {o.rank}: {o.status}: {o.value}" for o in outcomes if o.status != "ok"]
    if errors:
        raise RuntimeError("\n".join(errors))
    return [o.value for o in outcomes]


def _fn_main(spec: RankSpec, threads: int, fn: Callable, args: tuple, queue) -> None:
    torch.set_num_threads(threads)
    try:
        with process_group(spec):
            result = fn(spec.rank, spec.world_size, *args)
            # Pickled by value here: shared-memory tensor handles die with this process.
            payload = pickle.dumps(result)
        queue.put((spec.rank, "ok", payload))
    except BaseException as exc:  # report every failure to the parent, with its traceback
        queue.put((spec.rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
