"""``fault``: the S3 endpoint going away and coming back (a TCP proxy process in front of a
moto server, SIGKILLed and started again on the same port, so the bucket keeps its objects).
A save during the outage fails cleanly and training goes on; the next save after the server
returns succeeds; reads retry with backoff a bounded number of times, saying so, and an outage
never makes a valid checkpoint look corrupt."""

from __future__ import annotations

import functools
import threading

import pytest
from ray_jobs import dataset, tiny_config
from s3_server import moto_s3
from tcp_proxy import Proxy

import elastic_ckpt.storage.fs as storage_fs
from elastic_ckpt import CheckpointManager, StorageError, verify
from elastic_ckpt.train import TrainJob, TrainSpec, build_gpt, lm_loss
from elastic_ckpt.train.events import CheckpointCommitted, CheckpointFailed, CheckpointStaged
from elastic_ckpt.train.local import free_port, run_local_group

pytestmark = [pytest.mark.fault]


@pytest.fixture
def s3_behind_proxy():
    """``(uri, proxy)``: a bucket on a moto server reached only through ``proxy``."""
    with moto_s3("outage") as (query, _):
        moto_port = int(query.split("endpoint_override=")[1].split("&")[0].rsplit(":", 1)[1])
        proxy = Proxy(free_port(), moto_port).start()
        try:
            uri = (f"s3://outage/run?endpoint_override=127.0.0.1:{proxy.listen}"
                   "&scheme=http&region=us-east-1")
            yield uri, proxy
        finally:
            proxy.kill()


def _model_state():
    import torch
    return {"app": {"w": torch.arange(12.0).reshape(3, 4)}, "extra": {"step": 1}}


def test_reads_retry_through_an_outage_and_never_call_it_corrupt(s3_behind_proxy, caplog,
                                                                 monkeypatch):
    uri, proxy = s3_behind_proxy
    monkeypatch.setattr(storage_fs, "READ_ATTEMPTS", 2)  # each attempt is ~6 s of the SDK's
    CheckpointManager(uri).save(1, _model_state())
    proxy.kill()
    # The AWS SDK itself retries for ~6 s; the endpoint is back after that, within ours.
    threading.Timer(7.0, proxy.start).start()
    target = _model_state()
    target["app"]["w"].zero_()
    info = CheckpointManager(uri).load(target)
    assert info.step == 1 and target["app"]["w"].sum() == 66
    assert "failed (attempt 1 of 2)" in caplog.text and "retrying in 0.5 s" in caplog.text
    proxy.kill()  # down for good: a typed storage error, not corruption
    with pytest.raises(StorageError) as err:
        CheckpointManager(uri).load(_model_state(), fallback=True)
    assert "after 2 attempts" in str(err.value), err.value
    proxy.start()
    assert [c.step for c in CheckpointManager(uri).list()] == [1]  # nothing quarantined


@pytest.mark.slow  # ~60 s: each failed save waits out the AWS SDK's and our retries
def test_a_save_during_an_outage_fails_cleanly_and_training_goes_on(tmp_path,
                                                                   s3_behind_proxy):
    uri, proxy = s3_behind_proxy
    config = tiny_config(tmp_path, max_steps=20, checkpoint__uri=uri,
                         checkpoint__interval_steps=4)
    job = TrainJob(config=config, dataset=dataset(),
                   spec=TrainSpec(model_fn=functools.partial(build_gpt, config.model),
                                  loss_fn=lm_loss))
    events = []

    def on_event(event):
        events.append(event)
        if isinstance(event, CheckpointStaged) and event.step == 8:
            proxy.kill()  # the endpoint goes away while step 8 persists

    def on_step(m):
        if m.step == 13:
            proxy.start()  # and comes back

    result = run_local_group(job, 2, on_step=on_step, on_event=on_event)
    failed = [e.step for e in events if isinstance(e, CheckpointFailed)]
    committed = [e.step for e in events if isinstance(e, CheckpointCommitted)]
    assert 8 in failed, events
    assert 4 in committed and [s for s in committed if s > 8][0] >= 16, committed
    assert result.final_step == 20 and result.checkpoint.step == 20  # training never stopped
    mgr = CheckpointManager(uri)
    steps = [c.step for c in mgr.list()]
    assert 8 not in steps and steps[-1] == 20, steps
    for info in mgr.list():
        verify(info.uri)
