"""Async checkpoints in the step loop, on a real full disk (a small tmpfs as the checkpoint
root): a background failure is a warning and training goes on; saves succeed again once space
frees; ``checkpoint.max_failed_saves`` in a row end the run naming the cause."""

from __future__ import annotations

import functools

import pytest
from mounts import tmpfs
from ray_jobs import dataset, tiny_config

from elastic_ckpt.train.events import CheckpointCommitted, CheckpointFailed, CheckpointStaged
from elastic_ckpt import CheckpointManager, verify
from elastic_ckpt.train import TrainJob, TrainSpec, build_gpt, lm_loss
from elastic_ckpt.train.local import run_local_group

pytestmark = [pytest.mark.fault, pytest.mark.dist]


@pytest.fixture
def full_disk(tmp_path):
    """A 2 MiB tmpfs, filled to the last byte by ``filler``."""
    with tmpfs(tmp_path / "disk", "size=2m") as root:
        filler = root / "filler"
        try:
            with open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * 65536)
                    f.flush()
        except OSError:
            pass
        yield root, filler


def _job(tmp_path, root, **overrides) -> TrainJob:
    config = tiny_config(tmp_path, max_steps=12, checkpoint__uri=str(root / "ckpt"),
                         checkpoint__interval_steps=2, **overrides)
    return TrainJob(config=config, dataset=dataset(),
                    spec=TrainSpec(model_fn=functools.partial(build_gpt, config.model),
                                   loss_fn=lm_loss))


def test_a_full_disk_is_a_warning_and_saves_resume_once_space_frees(tmp_path, full_disk):
    root, filler = full_disk
    events = []

    def on_event(event):
        events.append(event)
        if isinstance(event, CheckpointFailed):
            filler.unlink(missing_ok=True)  # the operator frees space

    job = _job(tmp_path, root)
    result = run_local_group(job, 1, on_event=on_event)
    failed = [e for e in events if isinstance(e, CheckpointFailed)]
    assert failed and failed[0].step == 2, events
    assert "ENOSPC" in failed[0].error and "rank-00000.bin" in failed[0].error, failed
    saved = [e.step for e in events if isinstance(e, CheckpointCommitted)]
    assert saved[-1] == 12 and all(s > 2 for s in saved), saved
    assert result.final_step == 12 and result.checkpoint.step == 12
    latest = CheckpointManager(job.config.checkpoint.uri).latest()
    assert latest.step == 12
    verify(latest.uri)
    staged = [e for e in events if isinstance(e, CheckpointStaged)]
    assert staged and len({e.staging_bytes for e in staged[1:]}) == 1  # no growth


def test_max_failed_saves_in_a_row_end_the_run_naming_the_cause(tmp_path, full_disk):
    root, _ = full_disk
    job = _job(tmp_path, root)
    with pytest.raises(RuntimeError) as err:
        run_local_group(job, 1)
    text = str(err.value)
    assert "CheckpointSavesFailedError" in text, text
    assert "3 checkpoint saves in a row failed (checkpoint.max_failed_saves=3)" in text, text
    assert "ENOSPC" in text and "Last committed checkpoint: none" in text, text
