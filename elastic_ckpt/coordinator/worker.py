"""``TrainWorker``: the Ray actor that runs one rank.

It is a threaded actor: ``run()`` trains on one thread while ``poll()`` and ``request_stop()``
are served on others, so reporting never blocks a step and a stop request lands mid-run.
"""

from __future__ import annotations

import collections
import dataclasses
import socket
import threading
import time
from typing import Any, Callable

import ray
import torch

from elastic_ckpt.config import TrainConfig
from elastic_ckpt.train import RankHooks, RankResult, RankSpec, RankTrainer, StepMetrics
from elastic_ckpt.train.distributed import process_group


@dataclasses.dataclass(frozen=True)
class WorkerJob:
    """What every rank needs to train; shipped to each actor once, at creation."""

    config: TrainConfig
    model_fn: Callable[[], torch.nn.Module]
    dataset: Any
    loss_fn: Callable
    collate_fn: Callable | None = None


@dataclasses.dataclass(frozen=True)
class WorkerReport:
    """What ``poll()`` returns: everything that happened since the previous poll."""

    steps: tuple[StepMetrics, ...]
    events: tuple[tuple[str, dict[str, Any]], ...]


class TrainWorker:
    def __init__(self, job: WorkerJob) -> None:
        self.job = job
        self._steps: collections.deque[StepMetrics] = collections.deque()
        self._events: collections.deque[tuple[str, dict]] = collections.deque()
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

    def run(self, spec: RankSpec) -> RankResult:
        """Train as rank ``spec.rank`` until max_steps or a stop request; collective."""
        started = time.perf_counter()
        hooks = RankHooks(should_stop=self._stop.is_set, on_step=self._steps.append,
                          on_event=lambda name, fields: self._events.append((name, fields)))
        with process_group(spec):
            self._events.append(("rendezvous", {"seconds": time.perf_counter() - started}))
            trainer = RankTrainer(self.job.config, self.job.model_fn, self.job.dataset,
                                  self.job.loss_fn, self.job.collate_fn, hooks=hooks,
                                  device=spec.device)
            return trainer.run()

    def poll(self) -> WorkerReport:
        steps = tuple(_drain(self._steps))
        events = tuple(_drain(self._events))
        return WorkerReport(steps=steps, events=events)

    def request_stop(self) -> None:
        """Stop at the next step boundary, with a checkpoint (the group agrees on the step)."""
        self._stop.set()


def _drain(queue: collections.deque) -> list:
    out = []
    while True:
        try:
            out.append(queue.popleft())
        except IndexError:
            return out
