"""Run telemetry: ``metrics.jsonl`` (the run-dir contract), TensorBoard scalars, failing sinks
that warn once, and (``ray``) a real run's files plus the Ray metrics a Prometheus scrape of
the node's metrics export port sees."""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import sys
import tempfile
import time
import types
import urllib.request
import warnings

import psutil
import pytest
from ray_jobs import Faults, tiny_config, trainer_kwargs
from ray_head import processes_of, stop_ray

from elastic_ckpt import ElasticTrainer
from elastic_ckpt.config import TrainConfig
from elastic_ckpt.coordinator import ScalingEvent
from elastic_ckpt.coordinator.telemetry import (
    JsonlMetrics,
    RayMetrics,
    RunTelemetry,
    Sink,
    TensorBoardMetrics,
    run_name,
)
from elastic_ckpt.errors import ConfigError
from elastic_ckpt.train import EvalMetrics, StepMetrics

STEP_KEYS = ["type", "time", "step", "loss", "lr", "world_size", "samples", "tokens",
             "tokens_per_s", "samples_per_s", "step_time_s", "metrics"]
EVAL_KEYS = ["type", "time", "step", "loss", "samples", "eval_time_s", "metrics"]
CHECKPOINT_KEYS = ["type", "time", "step", "seconds", "bytes"]
FAILURE_KEYS = ["type", "time", "at_step", "kind", "message"]


def step_metrics(step: int, loss: float = 2.5, **kw) -> StepMetrics:
    fields = dict(step=step, loss=loss, world_size=2, samples=16, tokens=1024, lr=1e-3,
                  step_time_s=0.5, rank=0, sample_ids=(), metrics={"acc": 0.25})
    return StepMetrics(**{**fields, **kw})


def event(kind="scale_up") -> ScalingEvent:
    return ScalingEvent(kind, "resize 1 -> 2", from_workers=1, to_workers=2, at_step=6,
                        resumed_step=4, phases={"detect": 0.5, "load": 1.25}, total_s=3.0)


def read_jsonl(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


class Recording(Sink):
    target = "recording"

    def __init__(self) -> None:
        self.calls: list[str] = []

    def step(self, m):
        self.calls.append(f"step {m.step}")

    def checkpoint(self, step, seconds, nbytes):
        self.calls.append(f"checkpoint {step}")


# -- units ------------------------------------------------------------------------------------
def test_jsonl_lines_follow_the_run_dir_contract(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    telemetry = RunTelemetry([JsonlMetrics(str(path))])
    before = time.time()
    telemetry.step(step_metrics(1, loss=2.5))
    telemetry.step(step_metrics(2, loss=2.25, metrics={}, step_time_s=0.0))
    telemetry.eval(EvalMetrics(step=2, loss=2.0, metrics={"acc": 0.5}, samples=40,
                               world_size=2, eval_time_s=0.125))
    telemetry.checkpoint(2, 0.75, 123456)
    telemetry.scaling_event(event())  # events.jsonl holds these, not metrics.jsonl
    telemetry.failure("worker_died", 2, "rank 1 died")
    telemetry.close()
    lines = read_jsonl(path)
    assert [list(line) for line in lines] == [STEP_KEYS, STEP_KEYS, EVAL_KEYS, CHECKPOINT_KEYS,
                                              FAILURE_KEYS]
    times = [line["time"] for line in lines]
    assert all(isinstance(t, float) for t in times)
    assert before <= times[0] and times == sorted(times) and times[-1] <= time.time()
    first = {k: v for k, v in lines[0].items() if k != "time"}
    assert first == {"type": "step", "step": 1, "loss": 2.5, "lr": 1e-3, "world_size": 2,
                     "samples": 16, "tokens": 1024, "tokens_per_s": 2048.0,
                     "samples_per_s": 32.0, "step_time_s": 0.5, "metrics": {"acc": 0.25}}
    assert type(first["step"]) is int and type(first["tokens"]) is int
    assert lines[1]["tokens_per_s"] == 0.0 and lines[1]["metrics"] == {}  # no division by 0
    assert {k: v for k, v in lines[2].items() if k != "time"} == {
        "type": "eval", "step": 2, "loss": 2.0, "samples": 40, "eval_time_s": 0.125,
        "metrics": {"acc": 0.5}}
    assert {k: v for k, v in lines[3].items() if k != "time"} == {
        "type": "checkpoint", "step": 2, "seconds": 0.75, "bytes": 123456}
    assert {k: v for k, v in lines[4].items() if k != "time"} == {
        "type": "failure", "at_step": 2, "kind": "worker_died", "message": "rank 1 died"}


def test_jsonl_appends_and_flushes_each_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"type": "step", "step": 0}\n')  # an earlier run in the same run_dir
    sink = JsonlMetrics(str(path))
    sink.step(step_metrics(1))
    assert [line["step"] for line in read_jsonl(path)] == [0, 1]  # on disk before close()
    sink.close()


def test_from_config_sinks_and_run_name(tmp_path):
    config = TrainConfig(run_dir=str(tmp_path / "my-run"))
    sinks = RunTelemetry.from_config(config).sinks
    assert [type(s) for s in sinks] == [JsonlMetrics, RayMetrics]
    RunTelemetry(sinks).close()
    assert sinks[0].path == str(tmp_path / "my-run" / "metrics.jsonl")
    assert run_name(config) == "my-run"
    assert run_name(TrainConfig(run_dir=str(tmp_path / "my-run") + "/")) == "my-run"
    tb = TrainConfig(run_dir=str(tmp_path / "r"), logging={"tensorboard": True})
    assert [type(s) for s in RunTelemetry.from_config(tb).sinks] == [
        JsonlMetrics, TensorBoardMetrics, RayMetrics]
    assert [type(s) for s in RunTelemetry.from_config(TrainConfig(run_dir="")).sinks] == [
        RayMetrics]


def test_unwritable_run_dir_warns_once_and_telemetry_keeps_working(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a regular file where the run directory should be")
    path = blocker / "metrics.jsonl"
    good = Recording()
    telemetry = RunTelemetry([JsonlMetrics(str(path)), good])
    with pytest.warns(RuntimeWarning) as caught:
        for step in range(1, 4):
            telemetry.step(step_metrics(step))
        telemetry.checkpoint(3, 0.1, 10)
        telemetry.close()
    messages = [str(w.message) for w in caught if issubclass(w.category, RuntimeWarning)]
    assert len(messages) == 1, messages
    assert str(path) in messages[0]
    assert "FileExistsError" in messages[0] or "NotADirectoryError" in messages[0]
    assert good.calls == ["step 1", "step 2", "step 3", "checkpoint 3"]


def test_unwritable_tensorboard_dir_warns_and_jsonl_keeps_working(tmp_path):
    (tmp_path / "tensorboard").write_text("a file, not a directory")
    config = TrainConfig(run_dir=str(tmp_path), logging={"tensorboard": True})
    telemetry = RunTelemetry.from_config(config)
    with pytest.warns(RuntimeWarning, match=re.escape(str(tmp_path / "tensorboard"))):
        telemetry.step(step_metrics(1))
        telemetry.step(step_metrics(2))
    telemetry.close()
    assert [line["step"] for line in read_jsonl(tmp_path / "metrics.jsonl")] == [1, 2]


def test_a_sink_failing_every_record_warns_once(tmp_path):
    class Broken(Sink):
        target = "broken"

        def step(self, m):
            raise OSError(28, "No space left on device")

    telemetry = RunTelemetry([Broken(), JsonlMetrics(str(tmp_path / "m.jsonl"))])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        telemetry.step(step_metrics(1))
        telemetry.step(step_metrics(2))
    assert len(caught) == 1 and "No space left on device" in str(caught[0].message)
    assert "broken" in str(caught[0].message)
    assert len(read_jsonl(tmp_path / "m.jsonl")) == 2


class FakeGauge:
    def __init__(self, name, description="", tag_keys=()):
        self.name, self.sets = name, []

    def set_default_tags(self, tags):
        self.default = tags

    def set(self, value, tags=None):
        self.sets.append((value, tags))


def test_ray_gauges_are_re_set_until_close(monkeypatch):
    from ray.util import metrics

    monkeypatch.setattr(metrics, "Gauge", FakeGauge)
    sink = RayMetrics("r", refresh_s=0.01)
    assert sink.step_g.default == {"run": "r"}
    sink.step(step_metrics(3))
    sink.scaling_event(event())
    time.sleep(0.2)  # the Ray agent drops gauges not reported for 2 report intervals
    assert len(sink.step_g.sets) > 5 and set(sink.step_g.sets) == {(3, None)}
    assert (1.25, {"kind": "scale_up", "phase": "load"}) in sink.phase_seconds.sets[-3:]
    sink.close()
    count = len(sink.step_g.sets)
    time.sleep(0.05)
    assert len(sink.step_g.sets) == count and not sink._thread.is_alive()


def accumulate(logdir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(logdir))
    acc.Reload()
    return acc


def test_tensorboard_scalars_read_back(tmp_path):
    logdir = tmp_path / "tensorboard"
    telemetry = RunTelemetry([TensorBoardMetrics(str(logdir))])
    losses = {1: 3.0, 2: 2.5, 3: 2.125}
    for step, loss in losses.items():
        telemetry.step(step_metrics(step, loss=loss))
    telemetry.eval(EvalMetrics(step=3, loss=2.0, metrics={"acc": 0.5}, samples=40,
                               world_size=2, eval_time_s=0.1))
    telemetry.checkpoint(3, 0.75, 4096)
    telemetry.scaling_event(event())
    telemetry.close()
    assert glob.glob(str(logdir / "events.out.tfevents.*"))
    acc = accumulate(logdir)
    scalars = set(acc.Tags()["scalars"])
    assert {"train/loss", "train/lr", "train/tokens_per_s", "train/world_size", "train/acc",
            "eval/loss", "eval/acc", "checkpoint/save_s", "checkpoint/bytes",
            "scaling/detect_s", "scaling/load_s", "scaling/total_s"} <= scalars
    assert [(e.step, e.value) for e in acc.Scalars("train/loss")] == list(losses.items())
    assert [(e.step, e.value) for e in acc.Scalars("train/tokens_per_s")][0] == (1, 2048.0)
    assert [(e.step, e.value) for e in acc.Scalars("checkpoint/bytes")] == [(3, 4096.0)]
    assert [(e.step, e.value) for e in acc.Scalars("scaling/total_s")] == [(6, 3.0)]


def test_tensorboard_missing_is_a_config_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import fails
    config = TrainConfig(run_dir=str(tmp_path), logging={"tensorboard": True})
    with pytest.raises(ConfigError, match=r"pip install tensorboard") as info:
        RunTelemetry.from_config(config)
    assert info.value.field == "logging.tensorboard"
    with pytest.raises(ConfigError, match=r"elastic_ckpt\[tensorboard\]"):
        ElasticTrainer(config=config)  # on the driver, before any Ray actor starts
    RunTelemetry.from_config(TrainConfig(run_dir=str(tmp_path)))  # not asked for: fine


def test_coordinator_reports_every_checkpoint_and_failure(tmp_path):
    """The wiring in ``Coordinator``: rank 0's checkpoint event reaches the telemetry with no
    scaling event pending, other ranks' do not; every failure is recorded when recovery
    begins (also those that do not come through ``_on_failure``)."""
    from elastic_ckpt.coordinator import Coordinator, Failure, FailureKind, FailurePolicy
    from elastic_ckpt.coordinator.record import RunRecord
    from elastic_ckpt.coordinator.state import Recovering, Starting
    from elastic_ckpt.train.events import CheckpointCommitted

    path = tmp_path / "metrics.jsonl"
    record = RunRecord()
    record.last_step = 7
    coordinator = types.SimpleNamespace(
        telemetry=RunTelemetry([JsonlMetrics(str(path))]), record=record, failures=0,
        failure_policy=FailurePolicy(3), _last_failure=None,
        capacity=types.SimpleNamespace(note_released=lambda workers: None),
        group=types.SimpleNamespace(keep_survivors=lambda timeout_s: [], workers=[]),
        config=types.SimpleNamespace(failure=types.SimpleNamespace(survivor_timeout_s=0)))
    committed = CheckpointCommitted(step=4, seconds=0.5, bytes=1000, is_async=True)
    Coordinator._on_rank_event(coordinator, 1, committed, None)
    Coordinator._on_rank_event(coordinator, 0, committed, None)
    state = Recovering(Failure(FailureKind.WORKER_DIED, "rank 1 died"),
                       ScalingEvent("failure", "rank 1 died", from_workers=2))
    assert isinstance(Coordinator._recovering(coordinator, state), Starting)
    coordinator.telemetry.close()
    assert [{k: v for k, v in line.items() if k != "time"} for line in read_jsonl(path)] == [
        {"type": "checkpoint", "step": 4, "seconds": 0.5, "bytes": 1000},
        {"type": "failure", "at_step": 7, "kind": "worker_died", "message": "rank 1 died"}]


# -- ray --------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def metrics_ray():
    """A local Ray on 127.0.0.1 (2 CPUs) whose metrics agent serves Prometheus text on a port
    of our choosing, reporting every 500 ms. Shut down afterwards; no process survives."""
    import ray
    import ray_jobs

    from elastic_ckpt.train.local import free_port

    ray.cloudpickle.register_pickle_by_value(ray_jobs)  # its slow loss runs on the workers
    assert not ray.is_initialized()
    temp_dir = tempfile.mkdtemp(prefix="rayh3-", dir="/tmp")  # short: unix socket paths
    port = free_port()
    saved = os.environ.get("RAY_metrics_report_interval_ms")
    os.environ["RAY_metrics_report_interval_ms"] = "500"  # read by every Ray process at start
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        ray.init(num_cpus=2, include_dashboard=False, _node_ip_address="127.0.0.1",
                 _metrics_export_port=port, _temp_dir=temp_dir, log_to_driver=True)
        yield port
    finally:
        # Every process Ray started (workers too: their titles no longer name temp_dir).
        started = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
        ray.shutdown()
        if saved is None:
            os.environ.pop("RAY_metrics_report_interval_ms", None)
        else:
            os.environ["RAY_metrics_report_interval_ms"] = saved
        _, alive = psutil.wait_procs(started, timeout=20)
        leftover = processes_of(temp_dir) + alive
        stop_ray(temp_dir)  # clean up whatever survived before failing
        for proc in alive:
            try:
                proc.kill()
            except psutil.NoSuchProcess:
                pass
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"Ray processes left behind: {[p.pid for p in leftover]}"


def two_worker_config(tmp_path, run: str, **overrides) -> TrainConfig:
    return tiny_config(tmp_path, max_steps=8, run_dir=str(tmp_path / run),
                       scaling__min_workers=2, scaling__max_workers=2,
                       checkpoint__interval_steps=4, **overrides)


@pytest.mark.ray
@pytest.mark.timeout(300)
def test_real_run_writes_metrics_jsonl_and_tensorboard(metrics_ray, tmp_path):
    config = two_worker_config(tmp_path, "run", logging__tensorboard=True)
    result = ElasticTrainer(config=config).fit()
    run_dir = tmp_path / "run"
    lines = read_jsonl(run_dir / "metrics.jsonl")
    steps = [line for line in lines if line["type"] == "step"]
    assert [s["step"] for s in steps] == list(range(1, 9))
    assert [s["loss"] for s in steps] == [h.loss for h in result.history]
    assert all(s["world_size"] == 2 and s["samples"] == 17 for s in steps)
    assert all(s["tokens_per_s"] == pytest.approx(s["tokens"] / s["step_time_s"])
               for s in steps)
    checkpoints = [line for line in lines if line["type"] == "checkpoint"]
    assert [c["step"] for c in checkpoints] == [4, 8]
    assert all(c["bytes"] > 0 and c["seconds"] > 0 for c in checkpoints)
    assert checkpoints[-1]["bytes"] == result.checkpoint.total_bytes
    assert not [line for line in lines if line["type"] == "failure"]
    acc = accumulate(run_dir / "tensorboard")
    tb_loss = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert [s for s, _ in tb_loss] == list(range(1, 9))
    assert [v for _, v in tb_loss] == pytest.approx([h.loss for h in result.history], rel=1e-6)
    assert [e.step for e in acc.Scalars("checkpoint/save_s")] == [4, 8]
    assert "scaling/total_s" in acc.Tags()["scalars"]


def scrape(port: int) -> list[tuple[str, dict[str, str], float]]:
    """(name, labels, value) of every sample the metrics agent serves."""
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read()
    samples = []
    for line in text.decode().splitlines():
        match = re.match(r"^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if match and not line.startswith("#"):
            labels = dict(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', match.group(2) or ""))
            samples.append((match.group(1), labels, float(match.group(3))))
    return samples


def values(samples, name: str, run: str, **tags) -> list[float]:
    return [v for n, labels, v in samples if n == f"ray_elastic_ckpt_{name}"
            and labels.get("run") == run and all(labels.get(k) == t for k, t in tags.items())]


@pytest.mark.ray
@pytest.mark.slow  # ~30 s with its Ray; metrics.jsonl and TensorBoard are tested in the default
@pytest.mark.timeout(300)
def test_prometheus_scrape_sees_the_run(metrics_ray, tmp_path):
    run = "scrape-run"
    config = two_worker_config(tmp_path, run)
    faults = Faults(tmp_path / "faults")
    faults.set("slow")  # ~0.5 s steps: the start event's gauges must outlive the agent's TTL
    seen: dict[str, list] = {}

    def ready(samples) -> bool:
        return values(samples, "step", run) == [8.0] and \
            sum(values(samples, "checkpoint_save_seconds_count", run)) >= 1

    def on_progress(progress) -> None:
        # Gauges vanish ~2 report intervals after the coordinator stops re-setting them (its
        # run() ends, then fit() kills it): scrape from here, while the run is finishing.
        if seen or not any(m.step == config.max_steps for m in progress.steps):
            return
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            samples = scrape(metrics_ray)
            if ready(samples):
                break
            time.sleep(0.25)
        seen["samples"] = samples

    result = ElasticTrainer(on_progress=on_progress, **trainer_kwargs(config, faults)).fit()
    ttl_s = 2 * 1.0  # 2 report intervals, each at least 1 s
    assert sum(h.step_time_s for h in result.history[1:]) > ttl_s + 0.5
    samples = seen["samples"]

    def one(name: str, **tags) -> float:
        found = values(samples, name, run, **tags)
        assert len(found) == 1, (name, tags, found, sorted(
            {n for n, _, _ in samples if "elastic_ckpt" in n}))
        return found[0]

    assert one("step") == 8
    assert one("world_size") == 2
    assert one("loss") == pytest.approx(result.history[-1].loss)
    assert one("tokens_per_second") > 0
    assert one("samples_total") == 8 * 17
    assert one("tokens_total") == sum(h.tokens for h in result.history)
    assert one("checkpoint_save_seconds_count") >= 1
    assert one("checkpoint_save_seconds_bucket", le="+Inf") >= 1
    assert one("checkpoint_bytes") > 0
    # Set at the first step, seconds before step 8: still there because it is re-set.
    assert one("resize_phase_seconds", kind="start", phase="total") > 0
    assert sum(values(samples, "failures_total", run)) == 0  # absent: nothing failed
