"""``ray`` test against Ray's real autoscaler (its ``fake_multinode`` provider: worker nodes are
local processes it launches): the cluster starts with no worker node, the trainer's
``request_resources`` makes the autoscaler launch nodes, training grows to ``max_workers``,
and the request is withdrawn when ``fit()`` returns. (That the autoscaler then removes the
idle nodes is Ray's part; its fake provider took minutes to, so it is not waited for.)"""

from __future__ import annotations

import json
import sys

import pytest
from ray_head import fake_autoscaling_head
from ray_jobs import Faults, Run, tiny_config, trainer_kwargs, wait_for

pytestmark = [pytest.mark.ray, pytest.mark.timeout(400)]


def _worker_cpus() -> float:
    import ray  # noqa: PLC0415

    return sum(n["Resources"].get("CPU", 0) for n in ray.nodes() if n["Alive"])


def _requested() -> list:
    """What the autoscaler is asked for (``request_resources``' record in the GCS, as Ray's
    v1 autoscaler reads it)."""
    from ray._private.ray_constants import AUTOSCALER_RESOURCE_REQUEST_CHANNEL  # noqa: PLC0415
    from ray.experimental.internal_kv import _internal_kv_get  # noqa: PLC0415

    raw = _internal_kv_get(AUTOSCALER_RESOURCE_REQUEST_CHANNEL)
    return json.loads(raw) if raw else []


def test_autoscaler_launches_nodes_for_the_trainer_and_the_request_is_withdrawn(tmp_path):
    import ray  # noqa: PLC0415

    config = tiny_config(tmp_path, max_steps=40, scaling__min_workers=1,
                         scaling__max_workers=2, scaling__settle_s=1.0,
                         scaling__capacity_timeout_s=180)
    faults = Faults(tmp_path / "faults")
    faults.set("slow")  # keep steps slow until the group has grown
    with fake_autoscaling_head(max_nodes=2) as head:
        ray.cloudpickle.register_pickle_by_value(sys.modules["ray_jobs"])
        ray.init(address=head.address)
        try:
            assert _worker_cpus() == 0, "no worker node before the trainer asks"
            run = Run(**trainer_kwargs(config, faults))
            wait_for(lambda: any(m.world_size == 2 for m in run.steps), 240,
                     "training at 2 workers on autoscaled nodes")
            asked = [_requested()]
            faults.clear("slow")
            result = run.join()
            sizes = [h.world_size for h in result.history]
            assert sizes[-1] == 2 and [h.step for h in result.history] == list(range(1, 41))
            assert "wait_capacity" in result.events[0].phases, result.events[0]
            assert asked == [[{"CPU": 1.0}] * 2], asked  # max_workers bundles while it ran
            # fit() withdrew its request (what lets the autoscaler remove idle nodes).
            assert _requested() == [], _requested()
        finally:
            ray.shutdown()
