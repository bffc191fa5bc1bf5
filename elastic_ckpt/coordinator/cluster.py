"""``ClusterView``: frozen snapshots of the Ray cluster (alive nodes, resources, drains) and how
many workers fit on it."""

from __future__ import annotations

import dataclasses
import logging
import math
import time
from typing import Any

import ray

log = logging.getLogger(__name__)


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


RAY_CHECKED = ((2, 40), (2, 60))
"""The Ray versions (major, minor; inclusive) whose private state API ``ClusterView`` was
checked against: ``ray._private.state.state.get_draining_nodes`` (drain notices and their
deadlines) and ``ray._private.state.available_resources_per_node`` (free resources per node).
``tests/test_policies.py`` pins the installed version to this range."""


def ray_internals() -> Any:
    """``ray._private.state``, after checking that what ``ClusterView`` uses is there: without
    it drains would go unnoticed (a preempted node's workers would just die) and capacity
    would be misjudged, so a Ray that lacks it is refused, naming what is missing."""
    from ray._private import state  # noqa: PLC0415 - per-node views live here

    missing = [name for name, owner in (("state.get_draining_nodes", state.state),
                                        ("available_resources_per_node", state))
               if not callable(getattr(owner, name.rpartition(".")[2], None))]
    if missing:
        lo, hi = (".".join(map(str, v)) for v in RAY_CHECKED)
        raise RuntimeError(
            f"Ray {ray.__version__} lacks ray._private.state.{', '.join(missing)}, which "
            f"elastic_ckpt uses to see drains and free resources per node (checked with Ray "
            f"{lo} to {hi}). Install a Ray in that range.")
    return state


class ClusterView:
    """Polls Ray. Every call is a fresh snapshot; nothing is cached between polls."""

    def __init__(self) -> None:
        self._state = ray_internals()

    def snapshot(self) -> ClusterSnapshot:
        state = self._state
        try:  # present (checked at construction); a failing call is a GCS hiccup
            draining = dict(state.state.get_draining_nodes())
            available = state.available_resources_per_node()
        except Exception as exc:  # noqa: BLE001 - the next poll asks again
            log.warning("could not read the cluster's drains and free resources: %s", exc)
            draining, available = {}, {}
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

