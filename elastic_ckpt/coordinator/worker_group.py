"""``WorkerGroup``: N ``TrainWorker`` actors in one placement group, started, polled, stopped
and killed as a unit. It carries decisions out; it makes none."""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from elastic_ckpt.coordinator.policy import Failure, FailureKind
from elastic_ckpt.coordinator.worker import TrainWorker
from elastic_ckpt.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointSavesFailedError,
    ConfigError,
    RankError,
    SharedStorageError,
)
from elastic_ckpt.train import RankResult, RankSpec, TrainJob

ACTOR_START_TIMEOUT_S = 180.0
_FATAL = (ConfigError, CheckpointMismatchError, CheckpointCorruptError, SharedStorageError,
          CheckpointSavesFailedError)
_PRIORITY = {FailureKind.FATAL: 0, FailureKind.PREEMPTED: 1, FailureKind.NODE_DIED: 2,
             FailureKind.WORKER_DIED: 3, FailureKind.TRAINING_ERROR: 4}


class PlacementTimeout(Exception):
    """The placement group did not become ready in time (capacity vanished)."""


@dataclasses.dataclass(frozen=True)
class GroupPoll:
    """A frozen snapshot of the group at one poll."""

    results: tuple[RankResult | None, ...]
    failure: Failure | None

    @property
    def finished(self) -> bool:
        return self.failure is None and all(r is not None for r in self.results)


class WorkerGroup:
    def __init__(self, job: TrainJob, bundle: dict[str, float], strategy: str,
                 use_gpu: bool, sink: Any = None) -> None:
        self.job = job
        self.sink = sink
        """Actor handle that receives the ranks' reports (``report(generation, rank, ...)``)."""
        self.generation = 0
        self.bundle = bundle
        self.strategy = strategy
        self.use_gpu = use_gpu
        self.actors: list[Any] = []
        self.pg = None
        self.run_refs: list[Any] = []
        self.node_ids: list[str] = []
        self._results: list[RankResult | None] = []
        self._reports_sent: list[int] = []

    @property
    def reports_sent(self) -> list[int]:
        """Per rank, the reports a finished rank sent (0 while it runs)."""
        return list(self._reports_sent)

    @property
    def size(self) -> int:
        return len(self.actors)

    def bundles_per_node(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for node in self.node_ids:
            counts[node] = counts.get(node, 0) + 1
        return counts

    def place(self, num_workers: int, timeout_s: float) -> None:
        """Reserve ``num_workers`` bundles; raises ``PlacementTimeout`` if they don't fit."""
        self.pg = placement_group([dict(self.bundle)] * num_workers, strategy=self.strategy)
        try:
            ray.get(self.pg.ready(), timeout=timeout_s)
        except GetTimeoutError:
            remove_placement_group(self.pg)
            self.pg = None
            raise PlacementTimeout(f"{num_workers} bundles of {self.bundle} did not fit within "
                                   f"{timeout_s:.0f}s") from None

    def start(self) -> None:
        """Create one actor per bundle, rendezvous at rank 0's address, launch ``run``."""
        cls = ray.remote(TrainWorker)
        n = len(self.pg.bundle_specs)
        cpus = self.bundle.get("CPU", 0)
        custom = {k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU", "memory")}
        self.actors = [
            cls.options(
                num_cpus=cpus, num_gpus=self.bundle.get("GPU", 0), resources=custom or None,
                max_concurrency=4, max_restarts=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=i),
            ).remote(self.job)
            for i in range(n)
        ]
        # Bounded: an actor that never comes up is a failure, not a hang.
        self.node_ids = ray.get([a.node_id.remote() for a in self.actors],
                                timeout=ACTOR_START_TIMEOUT_S)
        addr, port = ray.get(self.actors[0].rendezvous_address.remote(),
                             timeout=ACTOR_START_TIMEOUT_S)
        self._results = [None] * n
        self._reports_sent = [0] * n
        self.generation += 1
        self.run_refs = [
            actor.run.remote(RankSpec(rank=r, world_size=n, master_addr=addr, master_port=port,
                                      use_gpu=self.use_gpu, node=self.node_ids[r]),
                             self.generation, self.sink)
            for r, actor in enumerate(self.actors)
        ]

    def poll(self) -> GroupPoll:
        """Collect finished ranks without blocking on training. A dead actor shows up as its
        ``run`` call failing."""
        failures: list[Failure] = []
        ready, _ = ray.wait(self.run_refs, num_returns=len(self.run_refs), timeout=0)
        for ref in ready:
            rank = self.run_refs.index(ref)
            if self._results[rank] is not None:
                continue
            try:
                self._results[rank], self._reports_sent[rank] = ray.get(ref)
            except RayError as exc:
                failures.append(_classify(exc, rank))
        # A peer's death surfaces in the survivors as collective errors; report the death.
        failure = min(failures, key=lambda f: _PRIORITY[f.kind]) if failures else None
        return GroupPoll(results=tuple(self._results), failure=failure)

    def request_stop(self) -> None:
        for actor in self.actors:
            actor.request_stop.remote()

    def wait_stopped(self, timeout_s: float) -> GroupPoll:
        """Wait until every rank returned (after a stop request) or one failed."""
        deadline = time.monotonic() + timeout_s
        while True:
            poll = self.poll()
            if poll.failure or poll.finished or time.monotonic() > deadline:
                return poll
            ray.wait(self.run_refs, num_returns=len(self.run_refs), timeout=0.2)

    def shutdown(self) -> None:
        """Kill every actor at once (never wait on a collective) and free the bundles."""
        for actor in self.actors:
            try:
                ray.kill(actor, no_restart=True)
            except Exception:
                pass
        if self.pg is not None:
            try:
                remove_placement_group(self.pg)
            except Exception:
                pass
        self.actors, self.run_refs, self.pg, self.node_ids = [], [], None, []


def _classify(exc: BaseException, rank: int | None) -> Failure:
    where = f"rank {rank}" if rank is not None else "a worker"
    if isinstance(exc, RayTaskError):
        cause = exc.cause if hasattr(exc, "cause") else None
        if isinstance(cause, _FATAL):
            return Failure(FailureKind.FATAL, f"{where}: {cause}")
        if isinstance(cause, RayActorError):
            return Failure(FailureKind.WORKER_DIED, f"{where}: {cause}")
        if isinstance(cause, RankError):
            return Failure(FailureKind.TRAINING_ERROR, str(cause), signature=(
                cause.error_type, cause.error_message, cause.step, cause.resumed_step))
        return Failure(FailureKind.TRAINING_ERROR, f"{where}: {exc}")
    if isinstance(exc, RayActorError):
        text = str(exc)
        preempted = getattr(exc, "preempted", False)
        if preempted:
            return Failure(FailureKind.PREEMPTED, f"{where} was preempted: {text}")
        node_died = "node" in text.lower() and ("died" in text.lower() or "dead" in text.lower())
        kind = FailureKind.NODE_DIED if node_died else FailureKind.WORKER_DIED
        return Failure(kind, f"{where} died: {text.splitlines()[0] if text else ''}")
    return Failure(FailureKind.WORKER_DIED, f"{where}: {exc}")
