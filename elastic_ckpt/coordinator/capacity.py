"""``CapacityMonitor``: how many workers the cluster has room for and which nodes drain by when,
as the scaling policy's ``Observation`` sees them.

Polls the ``ClusterView`` at most once per ``CLUSTER_POLL_INTERVAL_S`` (unless forced) and
remembers when the capacity last changed, so that a burst of node events settles before a
resize. The bundles the worker group holds count as room, and so do those of workers just
released: Ray's resource view shows freed bundles as used for a moment after the kill, so they
are counted as ours until the next group (or a spare) is placed. It reads the group; it never
changes it.
"""

from __future__ import annotations

import time

from elastic_ckpt.coordinator.cluster import ClusterView
from elastic_ckpt.coordinator.policy import Observation
from elastic_ckpt.coordinator.worker_group import Worker, WorkerGroup

CLUSTER_POLL_INTERVAL_S = 0.5


class CapacityMonitor:
    def __init__(self, cluster: ClusterView, bundle: dict[str, float],
                 group: WorkerGroup) -> None:
        self.cluster = cluster
        self.bundle = bundle
        self.group = group
        self._capacity = (0, time.time())  # (value, when it last changed)
        self._last_cluster_poll = 0.0
        self._drain_deadlines: dict[str, float | None] = {}  # draining node -> deadline
        self._released: dict[str, int] = {}  # node -> bundles of the group just torn down

    @property
    def changed_s(self) -> float:
        """When the capacity last changed."""
        return self._capacity[1]

    def observe(self, force: bool = False) -> int:
        """Workers that fit, as of the last cluster poll (a new one when due or ``force``)."""
        now = time.time()
        if force or now - self._last_cluster_poll >= CLUSTER_POLL_INTERVAL_S:
            self._last_cluster_poll = now
            snap = self.cluster.snapshot()
            self._drain_deadlines = {n.node_id: n.drain_deadline_s
                                     for n in snap.nodes if n.draining}
            own = dict(self.group.bundles_per_node())
            for node, n in self._released.items():
                own[node] = own.get(node, 0) + n
            capacity = snap.capacity(self.bundle, own)
            if capacity != self._capacity[0]:
                self._capacity = (capacity, now)
        return self._capacity[0]

    def observation(self, last_resize_s: float | None) -> Observation:
        capacity = self.observe()
        return Observation(
            now_s=time.time(), num_workers=self.group.size, capacity=capacity,
            capacity_changed_s=self._capacity[1],
            draining_workers=self.draining_workers(),
            last_resize_s=last_resize_s)

    def note_released(self, workers: list[Worker]) -> None:
        """Count the released workers' bundles as ours until the next placement (a dead
        node's bundles drop out with the node)."""
        for worker in workers:
            self._released[worker.node_id] = self._released.get(worker.node_id, 0) + 1

    def forget_released(self) -> None:
        """The next group (or a spare) is placed: stop counting the freed bundles."""
        self._released = {}

    def draining(self, node_id: str) -> bool:
        """Whether ``node_id`` was draining at the last poll."""
        return node_id in self._drain_deadlines

    def drain_deadline(self) -> float | None:
        """The earliest drain deadline among the group's nodes, as last observed."""
        deadlines = [d for node, d in self._drain_deadlines.items()
                     if node in self.group.node_ids and d]
        return min(deadlines) if deadlines else None

    def draining_workers(self) -> int:
        return sum(n in self._drain_deadlines for n in self.group.node_ids)
