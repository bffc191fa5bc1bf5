"""``TrainWorker``: the Ray actor that runs one rank.

It is a threaded actor: ``run()`` trains on one thread while ``request_stop()`` is served on
another, so a stop request lands mid-run. Reports are pushed, never polled.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
import traceback
from typing import Any

import ray
import torch

from elastic_ckpt.errors import ElasticCkptError, RankError
from elastic_ckpt.train import RankHooks, RankResult, RankSpec, TrainJob
from elastic_ckpt.train.distributed import process_group
from elastic_ckpt.train.storage_check import check_shared_storage


class TrainWorker:
    """One rank. Reports every step and event to ``sink`` (the coordinator's actor handle)
    with fire-and-forget calls, so nothing waits on the coordinator and a report sent just
    before the process dies still arrives."""

    def __init__(self, job: TrainJob) -> None:
        self.job = job
        self._stop = threading.Event()
        cpus = job.config.scaling.resources_per_worker.get("CPU", 1)
        torch.set_num_threads(max(1, int(cpus)))

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

        def report(kind: str, payload: Any) -> None:
            # Threaded actors may run calls out of order; ``seq`` lets the sink reorder.
            sink.report.remote(generation, spec.rank, next(seq), kind, payload)

        hooks = RankHooks(should_stop=self._stop.is_set,
                          on_step=lambda m: report("step", m),
                          on_eval=lambda m: report("eval", m),
                          on_event=lambda name, fields: report("event", (name, fields)))
        with process_group(spec):
            report("event", ("rendezvous", {"seconds": time.perf_counter() - started}))
            check_shared_storage(self.job.config.checkpoint.uri, spec.node or self.node_id())
            trainer = self.job.trainer(hooks, spec.device)
            try:
                result = trainer.run()
            except ElasticCkptError:
                raise  # typed: the runtime classifies it (fatal config/checkpoint errors)
            except Exception as exc:
                raise _rank_error(exc, spec.rank, trainer) from exc
        return result, next(seq)

    def request_stop(self) -> None:
        """Stop at the next step boundary, with a checkpoint (the group agrees on the step)."""
        self._stop.set()


def _rank_error(exc: Exception, rank: int, trainer: Any) -> RankError:
    """The user-code exception as a ``RankError``: where it happened and the traceback."""
    step, resumed = trainer.current_step, trainer.restored_step
    where = f"in step {step}" if step is not None else "before the first step"
    since = "" if resumed is None else f" (resumed from step {resumed})"
    text = "".join(traceback.format_exception(exc)).rstrip()
    return RankError(f"rank {rank} raised {where}{since}: {type(exc).__name__}: {exc}\n{text}",
                     rank=rank, step=step, resumed_step=resumed,
                     error_type=type(exc).__name__, error_message=str(exc), traceback=text)
