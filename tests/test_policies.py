"""Pure policies as tables, the transition table, the event record and the cluster capacity
arithmetic. No Ray, no clock."""

from __future__ import annotations

import pytest

from elastic_ckpt.coordinator.cluster import ClusterSnapshot, NodeView
from elastic_ckpt.coordinator.events import ScalingEvent, Timeline
from elastic_ckpt.coordinator.policy import (
    Failure,
    FailureDecision,
    FailureKind,
    FailurePolicy,
    NoopDecision,
    Observation,
    ResizeDecision,
    ScalingPolicy,
)
from elastic_ckpt.coordinator.state import (
    Failed,
    Finished,
    Recovering,
    Resizing,
    Running,
    Starting,
    Waiting,
    check_transition,
)

POLICY = ScalingPolicy(min_workers=2, max_workers=4, cooldown_s=5.0, settle_s=1.0)


def obs(num_workers=2, capacity=2, changed=0.0, now=100.0, draining=0, last_resize=50.0):
    return Observation(now_s=now, num_workers=num_workers, capacity=capacity,
                       capacity_changed_s=changed, draining_workers=draining,
                       last_resize_s=last_resize)


@pytest.mark.parametrize("observation, expected", [
    (obs(capacity=2), NoopDecision()),                                     # steady
    (obs(capacity=3), ResizeDecision(3, "scale_up")),                      # one more fits
    (obs(capacity=9), ResizeDecision(4, "scale_up")),                      # capped at max
    (obs(num_workers=4, capacity=9), NoopDecision()),                      # already at max
    (obs(capacity=3, changed=99.5), NoopDecision()),                       # still settling
    (obs(capacity=3, last_resize=97.0), NoopDecision()),                   # cooldown
    (obs(capacity=3, last_resize=None), ResizeDecision(3, "scale_up")),    # never resized
    (obs(num_workers=3, capacity=2), NoopDecision()),                      # less, no drain
    (obs(num_workers=3, capacity=2, draining=1, last_resize=99.9), ResizeDecision(2, "drain")),
    (obs(num_workers=3, capacity=5, draining=1, changed=99.9), ResizeDecision(4, "drain")),
    (obs(num_workers=2, capacity=0, draining=2), ResizeDecision(0, "drain")),
    (obs(num_workers=0, capacity=4), NoopDecision()),                      # nothing running
])
def test_scaling_policy_table(observation, expected):
    assert POLICY.decide(observation) == expected


@pytest.mark.parametrize("observation, wanted", [
    (obs(capacity=2), 2),                                  # steady: no spares
    (obs(capacity=3, changed=99.5), 3),                    # settling: the spare starts already
    (obs(capacity=3, last_resize=97.0), 3),                # in the cooldown too
    (obs(capacity=9), 4),                                  # capped at max_workers
    (obs(num_workers=3, capacity=2), 3),                   # less capacity: keep what runs
    (obs(num_workers=3, capacity=5, draining=1), 3),       # a drain first: no spares
    (obs(num_workers=0, capacity=4), 0),                   # nothing running
])
def test_spares_start_before_the_scale_up(observation, wanted):
    assert POLICY.wanted(observation) == wanted


@pytest.mark.parametrize("capacity, size", [(0, None), (1, None), (2, 2), (3, 3), (10, 4)])
def test_start_size(capacity, size):
    assert POLICY.start_size(capacity) == size


@pytest.mark.parametrize("kind, so_far, max_failures, expected", [
    (FailureKind.WORKER_DIED, 0, 3, FailureDecision.RETRY),
    (FailureKind.WORKER_DIED, 2, 3, FailureDecision.RETRY),
    (FailureKind.WORKER_DIED, 3, 3, FailureDecision.RAISE),
    (FailureKind.NODE_DIED, 0, 0, FailureDecision.RAISE),
    (FailureKind.TRAINING_ERROR, 1, 1, FailureDecision.RAISE),
    (FailureKind.PREEMPTED, 100, 0, FailureDecision.RETRY),   # preemptions never count
    (FailureKind.WORKER_DIED, 1000, None, FailureDecision.RETRY),
    (FailureKind.FATAL, 0, None, FailureDecision.RAISE),      # retrying can't fix it
])
def test_failure_policy_table(kind, so_far, max_failures, expected):
    policy = FailurePolicy(max_failures)
    assert policy.decide(Failure(kind, "x"), so_far) is expected
    assert policy.counts(Failure(kind, "x")) is (kind is not FailureKind.PREEMPTED)


_SIG = ("KeyError", "'labels'", 1, 0)  # type, message, step trained, step restored from
_TE = FailureKind.TRAINING_ERROR


@pytest.mark.parametrize("failure, previous, expected", [
    # The same error at the same step after restoring the same checkpoint: deterministic.
    (Failure(_TE, "a", _SIG), Failure(_TE, "a", _SIG), FailureDecision.RAISE),
    # The first time, or after another kind of failure: retried.
    (Failure(_TE, "a", _SIG), None, FailureDecision.RETRY),
    (Failure(_TE, "a", _SIG), Failure(FailureKind.WORKER_DIED, "died"), FailureDecision.RETRY),
    # Another step, another restore point, another message or type: not the same error.
    (Failure(_TE, "a", _SIG), Failure(_TE, "a", ("KeyError", "'labels'", 2, 0)),
     FailureDecision.RETRY),
    (Failure(_TE, "a", _SIG), Failure(_TE, "a", ("KeyError", "'labels'", 1, 4)),
     FailureDecision.RETRY),
    (Failure(_TE, "a", _SIG), Failure(_TE, "a", ("KeyError", "'ids'", 1, 0)),
     FailureDecision.RETRY),
    (Failure(_TE, "a", _SIG), Failure(_TE, "a", ("ValueError", "'labels'", 1, 0)),
     FailureDecision.RETRY),
    # Without a signature (a crash seen only from outside) nothing is known to repeat.
    (Failure(_TE, "a"), Failure(_TE, "a"), FailureDecision.RETRY),
])
def test_failure_policy_repeated_training_error(failure, previous, expected):
    policy = FailurePolicy(max_failures=None)
    assert policy.decide(failure, 1, previous) is expected
    assert policy.is_repeat(failure, previous) is (expected is FailureDecision.RAISE)


def _event():
    return ScalingEvent("start", "test", from_workers=0)


@pytest.mark.parametrize("old, new, ok", [
    (Starting(_event()), Running(_event(), 0.0), True),
    (Starting(_event()), Waiting(_event(), 0.0), True),
    (Running(None, 0.0), Finished(), True),
    (Running(None, 0.0), Resizing(ResizeDecision(3, "scale_up"), _event()), True),
    (Running(None, 0.0), Recovering(Failure(FailureKind.WORKER_DIED, "x"), _event()), True),
    (Resizing(ResizeDecision(3, "scale_up"), _event()), Starting(_event()), True),
    (Recovering(Failure(FailureKind.WORKER_DIED, "x"), _event()), Failed("x"), True),
    (Waiting(_event(), 0.0), Failed("x"), True),
    (Running(None, 0.0), Failed("x"), False),       # failures go through the failure policy
    (Starting(_event()), Finished(), False),
    (Waiting(_event(), 0.0), Running(None, 0.0), False),
    (Finished(), Starting(_event()), False),        # terminal
])
def test_transition_table(old, new, ok):
    if ok:
        check_transition(old, new)
    else:
        with pytest.raises(RuntimeError, match="illegal coordinator transition"):
            check_transition(old, new)


def _node(node_id, cpus, available=None, draining=False, gpus=0):
    total = {"CPU": cpus, "GPU": gpus}
    return NodeView(node_id, "127.0.0.1", total,
                    dict(total, CPU=cpus if available is None else available),
                    draining, None)


@pytest.mark.parametrize("nodes, own, bundle, expected", [
    ([_node("a", 1), _node("b", 1)], {}, {"CPU": 1}, 2),
    ([_node("a", 4), _node("b", 3)], {}, {"CPU": 2}, 3),                 # floor per node
    ([_node("a", 2, available=0)], {"a": 2}, {"CPU": 1}, 2),             # own bundles count
    ([_node("a", 2, available=0)], {}, {"CPU": 1}, 0),                   # someone else's
    ([_node("a", 1), _node("b", 1, draining=True)], {}, {"CPU": 1}, 1),  # draining excluded
    ([_node("a", 8, gpus=2), _node("b", 8)], {}, {"CPU": 1, "GPU": 1}, 2),
    ([], {}, {"CPU": 1}, 0),
])
def test_capacity(nodes, own, bundle, expected):
    assert ClusterSnapshot(0.0, tuple(nodes)).capacity(bundle, own) == expected


def test_event_steps_lost_and_timeline(tmp_path):
    event = ScalingEvent("failure", "rank 1 died", from_workers=2, at_step=11)
    assert event.steps_lost is None
    event.resumed_step = 8
    event.phases["detect"] = 0.25
    assert event.steps_lost == 3
    timeline = Timeline(str(tmp_path / "run" / "events.jsonl"))
    timeline.complete(event)
    line = (tmp_path / "run" / "events.jsonl").read_text().strip()
    assert '"steps_lost": 3' in line and '"kind": "failure"' in line
    assert timeline.events == [event] and event.total_s is not None


def test_the_ray_internals_the_cluster_view_uses_exist_in_the_checked_versions():
    import ray

    from elastic_ckpt.coordinator.cluster import RAY_CHECKED, ray_internals

    version = tuple(int(x) for x in ray.__version__.split(".")[:2])
    lo, hi = RAY_CHECKED
    assert lo <= version <= hi, (
        f"Ray {ray.__version__} is outside the checked range {RAY_CHECKED}: check drain "
        "detection (ray._private.state) against it, then widen RAY_CHECKED")
    ray_internals()


def test_a_ray_without_them_is_refused_naming_what_is_missing(monkeypatch):
    from ray._private import state

    from elastic_ckpt.coordinator.cluster import ClusterView

    monkeypatch.delattr(type(state.state), "get_draining_nodes")
    with pytest.raises(RuntimeError, match=r"lacks ray\._private\.state\.state\."
                                           r"get_draining_nodes.*Install a Ray in that range"):
        ClusterView()


def test_failures_are_classified_by_type_not_by_message():
    from ray.exceptions import ActorDiedError, RayTaskError

    from elastic_ckpt.coordinator.worker_group import _classify
    from elastic_ckpt.errors import ConfigError, RankError

    died = ActorDiedError()  # whatever its text says, the node table decides
    assert _classify(died, 1, node_alive=True).kind is FailureKind.WORKER_DIED
    assert _classify(died, 1, node_alive=False).kind is FailureKind.NODE_DIED
    preempted = ActorDiedError()
    preempted._preempted = True
    assert _classify(preempted, 1, node_alive=False).kind is FailureKind.PREEMPTED

    def task_error(cause):
        return RayTaskError("run", "traceback", cause)

    fatal = _classify(task_error(ConfigError("bad field", field="x")), 0)
    assert fatal.kind is FailureKind.FATAL
    rank_error = RankError("rank 0 raised in step 3: KeyError: 'x'", rank=0, step=3,
                           resumed_step=0, error_type="KeyError", error_message="'x'",
                           traceback="...")
    training = _classify(task_error(rank_error), 0)
    assert training.kind is FailureKind.TRAINING_ERROR
    assert training.signature == ("KeyError", "'x'", 3, 0)


def test_policies_are_injectable_and_the_coordinator_asks_them(tmp_path):
    from elastic_ckpt.config import TrainConfig
    from elastic_ckpt.coordinator import Coordinator, ScalingEvent
    from elastic_ckpt.coordinator.policy import FailurePolicyProtocol, ScalingPolicyProtocol
    from elastic_ckpt.coordinator.state import Failed, Recovering
    from elastic_ckpt.data import SyntheticLMDataset
    from elastic_ckpt.train import TrainJob, TrainSpec

    class NeverRetry:
        asked = []

        def decide(self, failure, failures_so_far, previous=None):
            self.asked.append((failure.kind, failures_so_far))
            return FailureDecision.RAISE

        def counts(self, failure):
            return True

        def is_repeat(self, failure, previous):
            return False

    class Fixed(ScalingPolicy):
        def wanted(self, obs):
            return obs.num_workers  # no spares

    config = TrainConfig(run_dir=str(tmp_path / "run"))
    job = TrainJob(config, TrainSpec(), SyntheticLMDataset(8, 16, 64))
    scaling, failures = Fixed(1, 1), NeverRetry()
    for protocol, policy in ((ScalingPolicyProtocol, scaling),
                             (FailurePolicyProtocol, failures)):  # what the docs promise
        assert all(callable(getattr(policy, m)) for m in vars(protocol)
                   if not m.startswith("_") and callable(vars(protocol)[m]))
    coordinator = Coordinator(config, job, cluster=object(), scaling_policy=scaling,
                              failure_policy=failures)
    assert coordinator.scaling is scaling and coordinator.failure_policy is failures
    state = Recovering(Failure(FailureKind.WORKER_DIED, "rank 1 died"),
                       ScalingEvent("failure", "rank 1 died", from_workers=1))
    try:
        out = coordinator._recovering(state)  # the default would retry a first crash
    finally:
        coordinator.telemetry.close()
    assert isinstance(out, Failed) and "rank 1 died" in out.error
    assert NeverRetry.asked == [(FailureKind.WORKER_DIED, 0)]


def test_the_inbox_hands_out_each_ranks_reports_in_order_and_only_of_this_group():
    from elastic_ckpt.coordinator.inbox import ReportInbox

    inbox = ReportInbox()
    inbox.put(1, 0, 1, "step", "r0 second")  # arrived before its predecessor
    inbox.put(1, 1, 0, "step", "r1 first")
    inbox.put(0, 0, 0, "step", "an old group's")  # a torn-down group: dropped
    assert inbox.take(1) == [(1, "step", "r1 first")]
    inbox.put(1, 0, 0, "event", "r0 first")
    assert inbox.take(1) == [(0, "event", "r0 first"), (0, "step", "r0 second")]
    assert (inbox.received(0), inbox.received(1), inbox.received(2)) == (2, 1, 0)
    inbox.reset()  # the next group counts from 0
    inbox.put(2, 0, 0, "step", "new group")
    assert inbox.take(2) == [(0, "step", "new group")] and inbox.received(0) == 1


def test_the_run_record_forgets_the_steps_a_restore_reruns_and_hands_progress_out_once():
    from elastic_ckpt.coordinator.record import RunRecord
    from elastic_ckpt.train import StepMetrics

    def step(s, rank):
        return StepMetrics(step=s, loss=1.0, world_size=2, samples=2, tokens=8, lr=0.1,
                           step_time_s=0.1, rank=rank, sample_ids=(2 * s + rank,))

    record = RunRecord(record_samples=True)
    for s in (1, 2, 3):
        record.step(1, step(s, 1))  # rank 1: the ledger only
        record.step(0, step(s, 0))
    assert record.last_step == 3 and [m.step for m in record.take_progress().steps] == [1, 2, 3]
    assert record.take_progress().steps == []  # taken
    record.restore(1)  # steps 2 and 3 run again
    assert (record.last_step, record.restored_step) == (1, 1)
    assert [m.step for m in record.steps()] == [1] and record.sample_ledger() == {1: (2, 3)}


def test_hang_watchdog_limits_and_progress() -> None:
    from elastic_ckpt.coordinator.watchdog import HangWatchdog

    dog = HangWatchdog(step_timeout_s=10, first_step_timeout_s=60)
    assert dog.check(1000.0) is None  # no group yet
    dog.start(0.0)
    assert dog.check(59.0) is None  # the first step gets first_step_timeout_s
    dog.progress(30.0)  # a restore event: progress, but not a step
    hang = dog.check(91.0)
    assert hang is not None and hang.first_step and hang.limit_s == 60
    assert hang.setting == "failure.first_step_timeout_s" and hang.seconds == 61.0
    dog.progress(95.0, step=True)
    assert dog.check(104.0) is None
    hang = dog.check(105.5)
    assert hang is not None and not hang.first_step and hang.setting == "failure.step_timeout_s"
    dog.progress(90.0, step=True)  # a report stamped earlier never moves the clock back
    assert dog.check(105.5) is not None
    dog.stop()
    assert dog.check(10_000.0) is None
    off = HangWatchdog(step_timeout_s=None, first_step_timeout_s=None)
    off.start(0.0)
    assert off.check(1e9) is None


def test_process_group_timeout_follows_the_watchdog() -> None:
    from elastic_ckpt.config import TrainConfig

    assert TrainConfig().process_group_timeout_s == 1800  # first_step_timeout_s
    cfg = TrainConfig.model_validate({"failure": {"step_timeout_s": 30,
                                                  "first_step_timeout_s": None}})
    assert cfg.process_group_timeout_s == 30
    cfg = TrainConfig.model_validate({"failure": {"step_timeout_s": None,
                                                  "first_step_timeout_s": None}})
    assert cfg.process_group_timeout_s == 600
    cfg = TrainConfig.model_validate({"scaling": {"process_group_timeout_s": 45}})
    assert cfg.process_group_timeout_s == 45
