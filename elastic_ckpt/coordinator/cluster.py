"""``ClusterView``: frozen snapshots of the Ray cluster (alive nodes, resources, drains) and how
many workers fit on it."""

from __future__ import annotations

import dataclasses
import math
import time

import ray


@dataclasses.dataclass(frozen=True)
class NodeView:
    node_id: str
    address: str
    total: dict[str, float]
    available: dict[str, float]
    draining: bool
    drain_deadline_s: float | None
    """Unix time of the drain deadline (None: no deadline or not draining)."""


@dataclasses.dataclass(frozen=True)
class ClusterSnapshot:
    taken_s: float
    nodes: tuple[NodeView, ...]

    def capacity(self, bundle: dict[str, float], own_bundles: dict[str, int]) -> int:
        """Workers that fit on alive, non-draining nodes: what is free plus the bundles the
        running group already holds there (``own_bundles``: node id -> count)."""
        total = 0
        for node in self.nodes:
            if node.draining:
                continue
            held = own_bundles.get(node.node_id, 0)
            fits = []
            for res, need in bundle.items():
                if need <= 0:
                    continue
                free = node.available.get(res, 0.0) + held * need
                fits.append(math.floor(free / need + 1e-9))
            total += min(fits) if fits else 0
        return total


class ClusterView:
    """Polls Ray. Every call is a fresh snapshot; nothing is cached between polls."""

    def snapshot(self) -> ClusterSnapshot:
        from ray._private import state  # noqa: PLC0415 - per-node views live here

        draining = _draining_nodes(state)
        try:
            available = state.available_resources_per_node()
        except Exception:  # older Ray: fall back to totals (a dedicated cluster)
            available = {}
        nodes = []
        for info in ray.nodes():
            if not info.get("Alive"):
                continue
            node_id = info["NodeID"]
            total = {k: float(v) for k, v in info.get("Resources", {}).items()}
            deadline = draining.get(node_id)
            nodes.append(NodeView(
                node_id=node_id, address=info.get("NodeManagerAddress", ""), total=total,
                available={k: float(v) for k, v in available.get(node_id, total).items()},
                draining=node_id in draining,
                drain_deadline_s=deadline / 1000.0 if deadline else None))
        return ClusterSnapshot(taken_s=time.time(), nodes=tuple(nodes))


def _draining_nodes(state) -> dict[str, int]:
    """node id -> drain deadline (unix ms, 0 when none)."""
    try:
        return dict(state.state.get_draining_nodes())
    except Exception:
        return {}
