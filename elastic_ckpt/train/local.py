"""Run a group of ranks on this machine with ``torch.multiprocessing`` (no Ray).

For demos, GPU checks (one rank per GPU) and benchmarks. Rank 0's step metrics and events
stream back to the parent through a queue, so progress can be shown while the group trains.
"""

from __future__ import annotations

import pickle
import queue as queue_mod
import socket
import traceback
from typing import Callable

import torch
import torch.multiprocessing as mp

from elastic_ckpt.train.distributed import RankSpec, process_group
from elastic_ckpt.train.loop import RankHooks, RankResult, StepMetrics, TrainJob


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def run_local_group(job: TrainJob, world_size: int,
                    on_step: Callable[[StepMetrics], None] = lambda m: None,
                    on_event: Callable[[str, dict], None] = lambda n, f: None,
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
                on_event(*payload)
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
                              on_event=lambda n, f: spec.rank == 0 and events.put(("event",
                                                                                   (n, f))))
            result = job.trainer(hooks, spec.device).run()
        events.put(("done", (spec.rank, pickle.dumps(result))))
    except BaseException as exc:  # report to the parent, which tears the group down
        events.put(("error", f"rank {spec.rank}: {type(exc).__name__}: {exc}\n"
                             f"{traceback.format_exc()}"))
