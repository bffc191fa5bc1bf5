"""``ray`` fault tests of what large clusters suffer most (issue 12's matrix), on a loopback
``ray.cluster_utils.Cluster`` or a ``ray start`` head, checked against the fixed-size reference
run where training completes: a hung rank, a drain deadline shorter than the save, the driver
killed or stopped with ``ray job stop``."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml
from ray_head import ray_cli, ray_head
from ray_jobs import (
    Faults,
    Run,
    drain_node,
    loopback_cluster,
    tiny_config,
    trainer_kwargs,
    wait_for,
)
from test_elastic_ray import check_exact_training, reference_losses
from test_job_submit import submit

from elastic_ckpt import CheckpointManager, TrainingStoppedError, verify

REPO = Path(__file__).resolve().parents[1]

pytestmark = [pytest.mark.ray, pytest.mark.fault, pytest.mark.timeout(600)]


def test_a_stopped_rank_is_detected_killed_and_training_resumes(tmp_path):
    """SIGSTOP of one rank freezes it and blocks its peer in a collective: nothing reports.
    The watchdog declares the group hung after ``step_timeout_s``, SIGKILLs the process that
    no longer answers, keeps the blocked one, and training resumes from the latest commit."""
    config = tiny_config(tmp_path, max_steps=24, scaling__max_workers=2,
                         failure__step_timeout_s=10, failure__first_step_timeout_s=120)
    ref = reference_losses(config, tmp_path)
    faults = Faults(tmp_path / "faults")
    with loopback_cluster(num_nodes=2) as cluster:
        assert cluster
        run = Run(**trainer_kwargs(config, faults))
        wait_for(lambda: run.reached(9, world_size=2), 180, "step 9 at 2 workers")
        committed = [c.step for c in CheckpointManager(config.checkpoint.uri).list()]
        faults.set("sigstop-rank-1")
        result = run.join()
    failures = [e for e in result.events if e.kind == "failure"]
    assert len(failures) == 1, [e.message for e in result.events]
    hang = failures[0]
    assert "hung" in hang.message and "rank(s) [1] stopped responding" in hang.message, \
        hang.message
    assert hang.phases["detect"] >= 10  # never before step_timeout_s of silence
    print(f"hang detected after {hang.phases['detect']:.1f} s of silence (limit 10 s)")
    assert hang.resumed_step >= max(committed)  # no committed checkpoint lost
    assert hang.details["workers_kept"] == 1, hang.details  # the blocked peer trained on
    check_exact_training(result, config, ref)


def test_stop_kills_the_run_releases_the_lease_and_names_the_last_commit(tmp_path):
    """``ElasticTrainer.stop()`` from another thread (what ``jobs/train.py``'s SIGTERM
    handler calls): ``fit()`` raises ``TrainingStoppedError`` naming the latest commit, every
    actor of the run is gone, the lease is released and nothing is committed after."""
    import psutil  # noqa: PLC0415
    import ray  # noqa: PLC0415

    config = tiny_config(tmp_path, max_steps=400, scaling__max_workers=1)
    with loopback_cluster(num_nodes=1):
        run = Run(**trainer_kwargs(config, Faults(tmp_path / "faults")))
        wait_for(lambda: run.reached(9), 180, "step 9")
        name = run.trainer.coordinator_name
        members = ray.get(ray.get_actor(name).processes.remote())["members"]
        pids = [pid for _, pid in members]
        assert pids
        run.trainer.stop("stopped by the test")
        with pytest.raises(TrainingStoppedError) as stopped:
            run.join(60)
        latest = CheckpointManager(config.checkpoint.uri).latest()
        assert "training stopped (stopped by the test)" in str(stopped.value)
        assert f"last committed checkpoint: {latest.uri}" in str(stopped.value)
        assert stopped.value.reason == "stopped by the test"
        wait_for(lambda: not any(psutil.pid_exists(pid) for pid in pids), 60,
                 "the workers' processes gone")
        with pytest.raises(ValueError):  # the coordinator actor is gone too
            ray.get_actor(name)
    assert not (Path(config.checkpoint.uri) / ".lease").exists()
    assert CheckpointManager(config.checkpoint.uri).latest().step == latest.step


@pytest.mark.slow  # ~35 s; the chaos soak drains nodes in the default suite
def test_a_drain_deadline_shorter_than_the_save_falls_back_to_the_last_commit(tmp_path):
    """The stop checkpoint of a drain takes longer than the drain's deadline, at which the
    node is taken away mid-save: the group is given up at the deadline, nothing torn is
    committed, and training resumes from the previous committed checkpoint at the size that
    is left, losing only the steps since."""
    config = tiny_config(tmp_path, max_steps=24, scaling__max_workers=2,
                         checkpoint__async_save=False)
    ref = reference_losses(config, tmp_path)
    faults = Faults(tmp_path / "faults")
    with loopback_cluster(num_nodes=2) as cluster:
        run = Run(**trainer_kwargs(config, faults))
        wait_for(lambda: run.reached(9, world_size=2), 180, "step 9 at 2 workers")
        faults.set("slow-save")
        node = next(iter(cluster.worker_nodes))
        drain_node(cluster.address, node.node_id, deadline_s=2)
        time.sleep(2.5)
        cluster.remove_node(node)  # the deadline passes: the cloud takes the node away
        wait_for(lambda: any(m.world_size == 1 for m in run.steps), 180, "training at 1")
        faults.clear("slow-save")
        result = run.join()
    given_up = [e for e in result.events if e.kind == "failure"]
    assert len(given_up) == 1, [(e.kind, e.message) for e in result.events]
    event = given_up[0]
    assert "did not stop before the deadline" in event.message, event.message
    assert event.resumed_step % config.checkpoint.interval_steps == 0  # the last commit
    assert event.steps_lost == event.at_step - event.resumed_step
    # Every committed checkpoint verifies: the stop save cut short left nothing torn.
    for info in CheckpointManager(config.checkpoint.uri).list():
        verify(info.uri)
    check_exact_training(result, config, ref)


@pytest.mark.slow  # ~65 s: a `ray start` head, two driver runs
def test_driver_death_takes_the_run_with_it_and_a_rerun_resumes(tmp_path):
    """SIGKILL of ``jobs/train.py`` (the driver): the coordinator and every worker go with it
    (Ray's owner death), no checkpoint is committed after that, and the same command run
    again resumes from the latest committed checkpoint (the dead driver's lease is taken
    over: its process is gone)."""
    config = tiny_config(tmp_path, max_steps=400, scaling__max_workers=2)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    with ray_head(num_cpus=2) as head:
        log = open(tmp_path / "driver.log", "w")
        driver = subprocess.Popen([sys.executable, "jobs/train.py", "--config", str(path),
                                   "--ray-address", head.address], cwd=REPO, stdout=log,
                                  stderr=subprocess.STDOUT)
        mgr = CheckpointManager(config.checkpoint.uri)
        try:
            wait_for(lambda: (mgr.latest() or 0) and mgr.latest().step >= 8, 240,
                     "a committed checkpoint at step 8")
            assert run_actors(head), "the run's actors are up"
        finally:
            driver.kill()  # SIGKILL: no atexit, no finally
            driver.wait(30)
        wait_for(lambda: not run_actors(head), 120, "the run's actors gone with the driver")
        last = mgr.latest().step
        time.sleep(3)
        assert mgr.latest().step == last  # no orphan rank goes on writing
        rerun = subprocess.run([sys.executable, "jobs/train.py", "--config", str(path),
                                "--ray-address", head.address, "--set",
                                f"max_steps={last + 3}"], cwd=REPO, capture_output=True,
                               text=True, timeout=300)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-4000:]
    assert f"resuming from step {last}" in out, out[-4000:]
    assert "taking over the lease" in out, out[-4000:]
    assert mgr.latest().step == last + 3


@pytest.mark.slow  # ~60 s: a `ray start` head, two submitted jobs
def test_ray_job_stop_stops_the_run_and_a_resubmit_resumes(tmp_path):
    """``ray job stop``: Ray sends the driver SIGTERM (SIGKILL 3 s later); ``jobs/train.py``
    turns it into ``ElasticTrainer.stop()``, which kills the coordinator and its workers and
    releases the lease within that grace, says what was kept, and the job ends stopped.
    Resubmitting resumes from the latest committed checkpoint without any lease takeover."""
    config = tiny_config(tmp_path, max_steps=400, scaling__max_workers=2)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(config.model_dump(mode="json")))
    mgr = CheckpointManager(config.checkpoint.uri)
    with ray_head(num_cpus=2) as head:
        started = submit(head, "--config", str(path), timeout=120,
                         options=("--no-wait", "--submission-id=stopme"))
        assert started.returncode == 0, started.stderr[-4000:]
        wait_for(lambda: (mgr.latest() or 0) and mgr.latest().step >= 8, 240,
                 "a committed checkpoint at step 8")
        stop = ray_cli("job", "stop", f"--address={head.dashboard}", "stopme", timeout=120)
        assert stop.returncode == 0, stop.stdout + stop.stderr
        wait_for(lambda: not run_actors(head), 60, "the run's actors gone")
        last = mgr.latest().step
        assert not (Path(config.checkpoint.uri) / ".lease").exists()  # released, not left
        status = ray_cli("job", "status", f"--address={head.dashboard}", "stopme")
        assert "Job 'stopme' was stopped" in status.stdout, status.stdout + status.stderr
        logs = ray_cli("job", "logs", f"--address={head.dashboard}", "stopme").stdout
        assert ("stopped: training stopped (SIGTERM received): the run's coordinator and "
                "workers were stopped and the checkpoint root's lease released") in logs, \
            logs[-4000:]
        assert f"last committed checkpoint: {mgr.latest().uri}" in logs, logs[-4000:]
        time.sleep(3)
        assert mgr.latest().step == last  # no orphan rank goes on writing
        rerun = submit(head, "--config", str(path), "--set", f"max_steps={last + 3}",
                       timeout=300)
    out = rerun.stdout + rerun.stderr
    assert rerun.returncode == 0, out[-4000:]
    assert f"resuming from step {last}" in out, out[-4000:]
    assert "taking over the lease" not in out, out[-4000:]
    assert mgr.latest().step == last + 3


def run_actors(head) -> list[str]:
    """The run's actors Ray lists as alive (coordinator and workers)."""
    out = ray_cli("list", "actors", f"--address={head.address}", "--format=json",
                  "--filter", "state=ALIVE", "--limit", "1000", timeout=60)
    assert out.returncode == 0, out.stderr[-2000:]
    if not out.stdout.lstrip().startswith("["):  # "No resource in the cluster"
        return []
    return [a["class_name"] for a in json.loads(out.stdout)
            if a.get("class_name") in ("Coordinator", "TrainWorker")]
