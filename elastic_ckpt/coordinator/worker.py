"""``TrainWorker``: the Ray actor that runs one rank, in one group after another.

It is a threaded actor: ``run()`` trains on one thread while ``request_stop()`` is served on
another, so a stop request lands mid-run. Reports are pushed, never polled. The process
outlives its groups: after ``run()`` returns (a stop for a resize, or an error because a peer
died) the coordinator may call ``run()`` again with the rank and world size of a new group;
torch, the user's code and the dataset are already loaded.
"""

from __future__ import annotations

import itertools
import os
import socket
import threading
import time
import traceback
from typing import Any

import ray
import torch

from elastic_ckpt.checkpoint.memory_tier import MemoryTier
from elastic_ckpt.errors import ElasticCkptError, RankError
from elastic_ckpt.train import RankHooks, RankResult, RankSpec, TrainJob
from elastic_ckpt.train.distributed import process_group
from elastic_ckpt.train.events import Rendezvous
from elastic_ckpt.train.loop import warm_up
from elastic_ckpt.train.storage_check import check_shared_storage


class TrainWorker:
    """One rank. Reports every step and event to ``sink`` (the coordinator's actor handle)
    with fire-and-forget calls, so nothing waits on the coordinator and a report sent just
    before the process dies still arrives."""

    def __init__(self, job: TrainJob) -> None:
        self.job = job
        self._stops: set[int] = set()  # generations asked to stop (a request may come first)
        self._lock = threading.Lock()
        self.groups_joined = 0
        self._held: Any = None  # the shards the last group's stop save wrote from here
        self._memory = (MemoryTier(self.node_id()) if job.config.checkpoint.memory_tier
                        else None)  # the peer-memory tier: it outlives the groups
        cpus = job.config.scaling.resources_per_worker.get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))

    def warm_up(self) -> tuple[str, int, float]:
        """What a new rank would otherwise do on the resize's critical path: open the
        dataset (its first sample), then ``train.loop.warm_up``: a rank's trainer (its
        checkpoint manager resolves the checkpoint root's filesystem) and the model built and
        sharded once on meta. Returns ``identity()`` and the seconds it took."""
        t0 = time.perf_counter()
        if len(self.job.dataset):
            self.job.dataset[0]
        warm_up(self.job)
        return (*self.identity(), time.perf_counter() - t0)

    def identity(self) -> tuple[str, int]:
        """``(node id, pid)``: where this worker runs, and that it still does."""
        return self.node_id(), os.getpid()

    def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP and a port that was free a moment ago (a fresh one per group)."""
        ip = ray.util.get_node_ip_address()
        with socket.socket() as s:
            s.bind((ip, 0))
            return ip, s.getsockname()[1]

    def run(self, spec: RankSpec, generation: int, sink: Any) -> tuple[RankResult, int]:
        """Train as rank ``spec.rank`` of group ``generation`` until max_steps or a stop
        request; collective over the group. Returns the result and how many reports were
        sent (so the sink can wait for the last ones)."""
        started = time.perf_counter()
        seq = itertools.count()
        with self._lock:
            self.groups_joined += 1
            joined = self.groups_joined

        def report(kind: str, payload: Any) -> None:
            # Threaded actors may run calls out of order; ``seq`` lets the sink reorder.
            sink.report.remote(generation, spec.rank, next(seq), kind, payload)

        hooks = RankHooks(should_stop=lambda: generation in self._stops,
                          on_step=lambda m: report("step", m),
                          on_eval=lambda m: report("eval", m),
                          on_event=lambda event: report("event", event))
        with process_group(spec):
            report("event", Rendezvous(time.perf_counter() - started, os.getpid(), joined))
            check_shared_storage(self.job.config.checkpoint.uri, spec.node or self.node_id())
            trainer = self.job.trainer(hooks, spec.device, held=self._held,
                                       memory=self._memory)
            self._held = None
            try:
                result = trainer.run()
            except ElasticCkptError:
                raise  # typed: the runtime classifies it (fatal config/checkpoint errors)
            except Exception as exc:
                raise _rank_error(exc, spec.rank, trainer) from exc
            finally:  # before the coordinator hears of the end: nothing left in flight
                trainer.close()
            # A stop for a resize: the next group can re-shard from this process's memory.
            self._held = trainer.ckpt.held if result.stopped else None
        return result, next(seq)

    def request_stop(self, generation: int) -> None:
        """Stop group ``generation`` at its next step boundary, with a checkpoint (the group
        agrees on the step). Ignored by the runs of other groups."""
        self._stops.add(generation)


def _rank_error(exc: Exception, rank: int, trainer: Any) -> RankError:
    """The user-code exception as a ``RankError``: where it happened and the traceback."""
    step, resumed = trainer.current_step, trainer.restored_step
    where = f"in step {step}" if step is not None else "before the first step"
    since = "" if resumed is None else f" (resumed from step {resumed})"
    text = "".join(traceback.format_exception(exc)).rstrip()
    return RankError(f"rank {rank} raised {where}{since}: {type(exc).__name__}: {exc}\n{text}",
                     rank=rank, step=step, resumed_step=resumed,
                     error_type=type(exc).__name__, error_message=str(exc), traceback=text)
