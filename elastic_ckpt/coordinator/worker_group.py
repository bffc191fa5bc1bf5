"""``WorkerGroup``: the ``TrainWorker`` actors that train together, each in its own one-bundle
placement group, so that a resize adds or removes workers and keeps the others' processes.
It carries decisions out; it makes none."""

from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any

import ray
from ray.exceptions import GetTimeoutError, RayActorError, RayError, RayTaskError
from ray.util.placement_group import (
    placement_group,
    placement_group_table,
    remove_placement_group,
)
from ray.util.scheduling_strategies import (
    NodeAffinitySchedulingStrategy,
    PlacementGroupSchedulingStrategy,
)

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

_FATAL = (ConfigError, CheckpointMismatchError, CheckpointCorruptError, SharedStorageError,
          CheckpointSavesFailedError)
_PRIORITY = {FailureKind.FATAL: 0, FailureKind.PREEMPTED: 1, FailureKind.NODE_DIED: 2,
             FailureKind.WORKER_DIED: 3, FailureKind.TRAINING_ERROR: 4}
_PING_TIMEOUT_S = 5.0
_SPREAD_PROBE_S = 1.0  # SPREAD: how long a bundle tries nodes without a worker first
_NODE_LABEL = "ray.io/node-id"  # every Ray node's own label


class PlacementTimeout(Exception):
    """The new workers' bundles did not become ready in time (capacity vanished)."""


@dataclasses.dataclass
class Worker:
    """One worker process: its actor, its placement group, where it runs."""

    actor: Any
    pg: Any
    node_id: str = ""
    pid: int = 0
    warm_up: Any = None
    """A spare's pending ``warm_up`` call (None once it is ready)."""
    started_s: float = 0.0
    warm_s: float | None = None
    """Seconds a spare took from creation to warmed up (None: not a spare, or not ready)."""


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
                 use_gpu: bool, sink: Any = None, *, actor_start_timeout_s: float = 180.0,
                 process_group_timeout_s: float = 600.0) -> None:
        self.job = job
        self.sink = sink
        """Actor handle that receives the ranks' reports (``report(generation, rank, ...)``)."""
        self.generation = 0
        self.bundle = bundle
        self.strategy = strategy
        self.use_gpu = use_gpu
        self.actor_start_timeout_s = actor_start_timeout_s
        self.process_group_timeout_s = process_group_timeout_s
        self.workers: list[Worker] = []
        """The members, in rank order once launched (kept workers first)."""
        self.spares: list[Worker] = []
        """Processes started for a coming scale-up while the group trains (hot spares)."""
        self.run_refs: list[Any] = []
        self._placed: list[Any] = []  # placement groups reserved for workers not started
        self._results: list[RankResult | None] = []
        self._reports_sent: list[int] = []

    @property
    def reports_sent(self) -> list[int]:
        """Per rank, the reports a finished rank sent (0 while it runs)."""
        return list(self._reports_sent)

    @property
    def size(self) -> int:
        return len(self.workers)

    @property
    def node_ids(self) -> list[str]:
        return [w.node_id for w in self.workers]

    def bundles_per_node(self) -> dict[str, int]:
        """The bundles this group holds per node: members' and spares'."""
        counts: dict[str, int] = {}
        for worker in self.workers + self.spares:
            counts[worker.node_id] = counts.get(worker.node_id, 0) + 1
        return counts

    def place(self, num_new: int, timeout_s: float) -> None:
        """Reserve one bundle for each of ``num_new`` more workers; raises
        ``PlacementTimeout`` (and reserves nothing) unless all fit within ``timeout_s``.
        ``SPREAD``/``STRICT_SPREAD`` place them one by one, each away from the nodes that
        already host a worker (a Ray label selector on ``ray.io/node-id``); ``SPREAD`` falls
        back to any node after a short try."""
        self._release_placed()
        if num_new <= 0:
            return
        deadline = time.monotonic() + timeout_s
        if self.strategy == "PACK":
            pgs = [placement_group([dict(self.bundle)], strategy="PACK")
                   for _ in range(num_new)]
            if not _ready(pgs, deadline):
                raise PlacementTimeout(f"{num_new} more bundles of {self.bundle} did not fit "
                                       f"within {timeout_s:.0f}s")
            self._placed = pgs
            return
        pgs, taken = [], {w.node_id for w in self.workers + self.spares}
        for _ in range(num_new):
            away = [{_NODE_LABEL: f"!in({','.join(sorted(taken))})"}] if taken else None
            pg = placement_group([dict(self.bundle)], strategy="PACK",
                                 bundle_label_selector=away)
            if self.strategy == "SPREAD" and away is not None:
                if not _ready([pg], min(deadline, time.monotonic() + _SPREAD_PROBE_S)):
                    pg = placement_group([dict(self.bundle)], strategy="PACK")  # share one
                    pg = pg if _ready([pg], deadline) else None
            elif not _ready([pg], deadline):
                pg = None
            if pg is None:
                _remove(pgs)
                where = (" on nodes without a worker (placement_strategy=STRICT_SPREAD)"
                         if self.strategy == "STRICT_SPREAD" else "")
                raise PlacementTimeout(f"{num_new} more bundles of {self.bundle} did not fit"
                                       f"{where} within {timeout_s:.0f}s")
            pgs.append(pg)
            taken.add(_node_of(pg))
        self._placed = pgs

    def start_placed(self) -> int:
        """Start a worker process in each bundle ``place`` reserved; returns how many. Bounded:
        an actor that never comes up raises (``GetTimeoutError``), not a hang."""
        new = self._create_placed()
        self.workers.extend(new)
        identities = ray.get([w.actor.identity.remote() for w in new],
                             timeout=self.actor_start_timeout_s)
        for worker, (node, pid) in zip(new, identities):
            worker.node_id, worker.pid = node, pid
        return len(new)

    def add_spares(self, n: int, timeout_s: float) -> int:
        """Place and start ``n`` more spare processes without waiting for them (each then
        runs ``warm_up``); returns how many were placed (0 when they do not fit yet)."""
        try:
            self.place(n, timeout_s)
        except PlacementTimeout:
            return 0
        new = self._create_placed()
        for worker in new:
            worker.warm_up = worker.actor.warm_up.remote()
        self.spares.extend(new)
        return len(new)

    def poll_spares(self) -> tuple[int, int]:
        """``(ready, warming)`` spares; a spare that died or outlived
        ``actor_start_timeout_s`` while starting is released."""
        warming = [w for w in self.spares if w.warm_up is not None]
        if warming:
            done, _ = ray.wait([w.warm_up for w in warming], num_returns=len(warming),
                               timeout=0)
            failed = []
            for worker in warming:
                if worker.warm_up in done:
                    try:
                        worker.node_id, worker.pid, _ = ray.get(worker.warm_up)
                        worker.warm_s = time.monotonic() - worker.started_s
                    except RayError:
                        failed.append(worker)
                    worker.warm_up = None
                elif time.monotonic() - worker.started_s > self.actor_start_timeout_s:
                    failed.append(worker)
            self.release_spares(failed)
        ready = sum(w.warm_up is None for w in self.spares)
        return ready, len(self.spares) - ready

    def adopt_spares(self, n: int) -> list[Worker]:
        """Make up to ``n`` ready spares members (the next ranks); returns them."""
        ready = [w for w in self.spares if w.warm_up is None][:n]
        self.spares = _without(self.spares, ready)
        self.workers.extend(ready)
        return ready

    def release_spares(self, spares: list[Worker] | None = None) -> None:
        spares = list(self.spares) if spares is None else spares
        _kill(spares)
        self.spares = _without(self.spares, spares)

    def _create_placed(self) -> list[Worker]:
        cls = ray.remote(TrainWorker)
        cpus = self.bundle.get("CPU", 0)
        custom = {k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU", "memory")}
        now = time.monotonic()
        new = [Worker(cls.options(
            num_cpus=cpus, num_gpus=self.bundle.get("GPU", 0), resources=custom or None,
            max_concurrency=4, max_restarts=0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=pg, placement_group_bundle_index=0),
        ).remote(self.job), pg, node_id=_node_of(pg), started_s=now) for pg in self._placed]
        self._placed = []
        return new

    def launch(self) -> None:
        """Form group ``generation + 1`` of every worker: rendezvous at rank 0's address and
        start ``run`` on each (kept processes and new ones alike)."""
        n = len(self.workers)
        addr, port = ray.get(self.workers[0].actor.rendezvous_address.remote(),
                             timeout=self.actor_start_timeout_s)
        self._results = [None] * n
        self._reports_sent = [0] * n
        self.generation += 1
        self.run_refs = [
            w.actor.run.remote(RankSpec(rank=r, world_size=n, master_addr=addr,
                                        master_port=port, use_gpu=self.use_gpu,
                                        timeout_s=self.process_group_timeout_s,
                                        node=w.node_id), self.generation, self.sink)
            for r, w in enumerate(self.workers)
        ]

    def poll(self) -> GroupPoll:
        """Collect finished ranks without blocking on training. A dead actor shows up as its
        ``run`` call failing."""
        failures: list[Failure] = []
        ready, _ = ray.wait(self.run_refs, num_returns=len(self.run_refs), timeout=0)
        alive: set[str] | None = None  # asked once, on the first dead actor
        for ref in ready:
            rank = self.run_refs.index(ref)
            if self._results[rank] is not None:
                continue
            try:
                self._results[rank], self._reports_sent[rank] = ray.get(ref)
            except RayError as exc:
                if alive is None and isinstance(exc, RayActorError):
                    alive = _alive_nodes(self.node_ids)
                failures.append(_classify(exc, rank, node_alive=alive is None or
                                          self.workers[rank].node_id in alive))
        # A peer's death surfaces in the survivors as collective errors; report the death.
        failure = min(failures, key=lambda f: _PRIORITY[f.kind]) if failures else None
        return GroupPoll(results=tuple(self._results), failure=failure)

    def request_stop(self) -> None:
        for worker in self.workers:
            worker.actor.request_stop.remote(self.generation)

    def wait_stopped(self, timeout_s: float) -> GroupPoll:
        """Wait until every rank returned (after a stop request) or one failed."""
        deadline = time.monotonic() + timeout_s
        while True:
            poll = self.poll()
            if poll.failure or poll.finished or time.monotonic() > deadline:
                return poll
            ray.wait(self.run_refs, num_returns=len(self.run_refs), timeout=0.2)

    def keep_survivors(self, timeout_s: float) -> list[Worker]:
        """After a worker died: wait up to ``timeout_s`` for the others' ``run`` to end (their
        collectives fail once a peer is gone), keep those whose process still answers, and
        kill the rest (dead, or still blocked). Returns the workers removed."""
        deadline = time.monotonic() + timeout_s
        pending = list(self.run_refs)
        while pending and time.monotonic() < deadline:
            _, pending = ray.wait(pending, num_returns=len(pending),
                                  timeout=max(0.0, deadline - time.monotonic()))
        ended = [ref not in pending for ref in self.run_refs]
        pings = {i: w.actor.identity.remote() for i, w in enumerate(self.workers) if ended[i]}
        alive = set()
        for i, ref in pings.items():
            try:
                node, pid = ray.get(ref, timeout=_PING_TIMEOUT_S)
            except (RayError, GetTimeoutError):
                continue
            if pid == self.workers[i].pid:
                alive.add(i)
        gone = [w for i, w in enumerate(self.workers) if i not in alive]
        self.release(gone)
        return gone

    def unresponsive(self, timeout_s: float = _PING_TIMEOUT_S) -> list[int]:
        """The ranks whose process does not answer a ping within ``timeout_s`` (stopped,
        or wedged so that the actor's other threads cannot run either)."""
        pings = [w.actor.identity.remote() for w in self.workers]
        deadline = time.monotonic() + timeout_s
        stuck = []
        for rank, ref in enumerate(pings):
            try:
                ray.get(ref, timeout=max(0.0, deadline - time.monotonic()))
            except (RayError, GetTimeoutError):
                stuck.append(rank)
        return stuck

    def sigkill(self, ranks: list[int], timeout_s: float = _PING_TIMEOUT_S) -> None:
        """SIGKILL the processes of these ranks where they run (a task pinned to the node:
        a stopped process handles no request, so ``ray.kill`` alone may never land). They
        stay members until the failure's ``keep_survivors`` finds them gone."""
        workers = [self.workers[r] for r in ranks]
        refs = [_sigkill.options(scheduling_strategy=NodeAffinitySchedulingStrategy(
            w.node_id, soft=False)).remote(w.pid) for w in workers if w.node_id and w.pid]
        try:
            ray.get(refs, timeout=timeout_s)
        except (RayError, GetTimeoutError):
            pass  # its node is gone too, or the kill below lands
        for w in workers:
            try:
                ray.kill(w.actor, no_restart=True)
            except Exception:
                pass

    def release(self, workers: list[Worker]) -> None:
        """Kill these workers at once (never wait on a collective) and free their bundles."""
        _kill(workers)
        self.workers = _without(self.workers, workers)
        self.run_refs, self._results, self._reports_sent = [], [], []

    def shutdown(self) -> None:
        """Kill every worker and spare and free every bundle."""
        self.release(list(self.workers))
        self.release_spares()
        self._release_placed()

    def _release_placed(self) -> None:
        _remove(self._placed)
        self._placed = []


def _ready(pgs: list[Any], deadline: float) -> bool:
    """Whether every one of ``pgs`` is placed by ``deadline``; removes them all if not."""
    try:
        ray.get([pg.ready() for pg in pgs], timeout=max(0.0, deadline - time.monotonic()))
        return True
    except GetTimeoutError:
        _remove(pgs)
        return False


def _alive_nodes(ours: list[str]) -> set[str]:
    """The nodes Ray's node table lists as alive (all of ``ours`` when it cannot be read:
    then a dead actor is not blamed on its node)."""
    try:
        return {n["NodeID"] for n in ray.nodes() if n.get("Alive")}
    except Exception:  # noqa: BLE001 - GCS unreachable
        return set(ours)


def _node_of(pg: Any) -> str:
    return placement_group_table(pg).get("bundles_to_node_id", {}).get(0, "")


def _without(workers: list[Worker], removed: list[Worker]) -> list[Worker]:
    """``workers`` minus ``removed``, by identity (two workers may hold equal fields)."""
    ids = {id(w) for w in removed}
    return [w for w in workers if id(w) not in ids]


@ray.remote(num_cpus=0, max_retries=0)
def _sigkill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def _kill(workers: list[Worker]) -> None:
    for worker in workers:
        try:
            ray.kill(worker.actor, no_restart=True)
        except Exception:
            pass
    _remove([w.pg for w in workers])


def _remove(pgs: list[Any]) -> None:
    for pg in pgs:
        try:
            remove_placement_group(pg)
        except Exception:
            pass


def _classify(exc: BaseException, rank: int | None, node_alive: bool = True) -> Failure:
    """A failed ``run`` call as a ``Failure``, by type: the typed errors a rank raises (fatal
    ones, ``RankError`` from training code), and for a dead actor Ray's ``preempted`` flag
    (its node was drained by the autoscaler) and whether its node is still alive in Ray's
    node table (``node_alive``), never by the wording of Ray's message."""
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
        if getattr(exc, "preempted", False):
            return Failure(FailureKind.PREEMPTED, f"{where} was preempted: {text}")
        first = text.splitlines()[0] if text else ""
        if not node_alive:
            return Failure(FailureKind.NODE_DIED, f"{where} died with its node: {first}")
        return Failure(FailureKind.WORKER_DIED, f"{where} died: {first}")
    return Failure(FailureKind.WORKER_DIED, f"{where}: {exc}")
