"""One writer per checkpoint root: the lease object (local paths and a real S3 server)."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import time

import pytest
from s3_server import moto_s3

from elastic_ckpt import CheckpointLeaseError
from elastic_ckpt.checkpoint.lease import LEASE_FILE, LeaseKeeper, RootLease
from elastic_ckpt.storage import Storage


def test_a_second_job_is_refused_naming_the_first(tmp_path) -> None:
    first = RootLease(str(tmp_path), "job-a", timeout_s=60)
    held = first.acquire()
    with pytest.raises(CheckpointLeaseError) as err:
        RootLease(str(tmp_path), "job-b", timeout_s=60).acquire()
    text = str(err.value)
    assert "in use by job 'job-a'" in text and f"pid {held.pid}" in text, text
    assert LEASE_FILE in text and "checkpoint.uri" in text
    first.release()
    assert not (tmp_path / LEASE_FILE).exists()
    RootLease(str(tmp_path), "job-b", timeout_s=60).acquire()  # free again


def test_a_stale_or_dead_holder_is_taken_over_and_logged(tmp_path, caplog) -> None:
    old = RootLease(str(tmp_path), "job-a", timeout_s=60)
    old.acquire()
    record = dataclasses.replace(old.record, heartbeat_unix_s=time.time() - 61)
    (tmp_path / LEASE_FILE).write_text(json.dumps(dataclasses.asdict(record)))
    new = RootLease(str(tmp_path), "job-b", timeout_s=60)
    new.acquire()
    assert "taking over the lease of job 'job-a'" in caplog.text
    assert "heartbeat is 61 s old" in caplog.text
    # The old holder notices at its next renewal and stops.
    with pytest.raises(CheckpointLeaseError, match="taken over by job 'job-b'"):
        old.renew()
    # A holder on this host whose process is gone: taken over at once, heartbeat fresh.
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    record = dataclasses.replace(new.record, pid=int(dead.stdout), owner="gone")
    (tmp_path / LEASE_FILE).write_text(json.dumps(dataclasses.asdict(record)))
    RootLease(str(tmp_path), "job-c", timeout_s=60).acquire()
    assert f"its process {int(dead.stdout)} on this host is gone" in caplog.text


def test_the_keeper_renews_and_reports_a_lost_lease(tmp_path) -> None:
    lease = RootLease(str(tmp_path), "job-a", timeout_s=0.4)
    lease.acquire()
    keeper = LeaseKeeper(lease).start()
    first = lease.record.heartbeat_unix_s
    deadline = time.time() + 10
    while lease.record.heartbeat_unix_s == first and time.time() < deadline:
        time.sleep(0.05)
    assert lease.record.heartbeat_unix_s > first  # renewed
    other = dataclasses.replace(lease.record, owner="someone-else", job="job-b")
    while keeper.lost is None and time.time() < deadline:
        # (rewritten: a renewal between its read and its write may overwrite a takeover,
        # and then the other job finds itself taken over at its own next renewal)
        (tmp_path / LEASE_FILE).write_text(json.dumps(dataclasses.asdict(other)))
        time.sleep(0.05)
    assert keeper.lost is not None and "job 'job-b'" in str(keeper.lost)
    keeper.stop()
    assert (tmp_path / LEASE_FILE).exists()  # not ours any more: left alone


def test_the_lease_works_on_s3() -> None:
    with moto_s3("leases") as (query, _):
        uri = f"s3://leases/run?{query}"
        lease = RootLease(uri, "job-a", timeout_s=60)
        lease.acquire()
        assert Storage(uri).exists(LEASE_FILE)
        with pytest.raises(CheckpointLeaseError, match="in use by job 'job-a'"):
            RootLease(uri, "job-b", timeout_s=60).acquire()
        lease.renew()
        lease.release()
        assert not Storage(uri).exists(LEASE_FILE)


def test_fit_is_refused_while_another_job_holds_the_root(tmp_path) -> None:
    """``ElasticTrainer.fit()`` takes the lease before anything starts: refused at once,
    naming the other job, without starting Ray."""
    from ray_jobs import Faults, tiny_config, trainer_kwargs

    from elastic_ckpt import ElasticTrainer

    config = tiny_config(tmp_path, max_steps=4)
    other = RootLease(config.checkpoint.uri, "the-other-job", timeout_s=60)
    other.acquire()
    with pytest.raises(CheckpointLeaseError) as refused:
        ElasticTrainer(**trainer_kwargs(config, Faults(tmp_path / "faults"))).fit()
    text = str(refused.value)
    assert f"checkpoint root {config.checkpoint.uri} is in use by job 'the-other-job'" in text
    other.release()
