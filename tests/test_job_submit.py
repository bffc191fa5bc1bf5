"""``ray job submit --working-dir . -- python jobs/train.py`` against a ``ray start --head``
bound to 127.0.0.1 (stopped afterwards by its private temp dir: other Ray instances on the
machine are left alone)."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from ray_head import ray_cli, ray_head

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]
EXCLUDES = json.dumps({"excludes": [".git", "checkpoints", "runs", "*.egg-info"]})


def submit(head, *args: str, timeout: float = 420, options: tuple[str, ...] = ()):
    """``ray job submit OPTIONS ... -- python jobs/train.py ARGS``, once the head's job agent
    is up."""
    deadline = time.time() + 90
    while True:
        out = ray_cli("job", "submit", f"--address={head.dashboard}", f"--working-dir={REPO}",
                      f"--runtime-env-json={EXCLUDES}", *options, "--", "python",
                      "jobs/train.py", *args, timeout=timeout)
        # Right after `ray start` the head's job agent may not be up yet.
        if "No available agent to submit job" not in out.stderr or time.time() > deadline:
            return out
        time.sleep(2)


def test_ray_job_submit_default_job_and_relative_paths(tmp_path):
    with ray_head(num_cpus=2) as head:
        # A relative checkpoint.uri would land in Ray's temporary working-dir copy: refused
        # before anything trains, naming the field and what to do.
        refused = submit(head, "--set", "max_steps=4", "--set", f"run_dir={tmp_path / 'r0'}",
                          timeout=240)
        out = refused.stdout + refused.stderr
        assert refused.returncode != 0, out[-4000:]
        assert "checkpoint.uri is the relative path './checkpoints'" in out, out[-4000:]
        assert "deletes when the job ends" in out and "s3://" in out, out[-4000:]
        assert "step      1" not in out

        job = submit(head, "--set", "max_steps=12",
                      "--set", f"checkpoint.uri={tmp_path / 'ckpt'}",
                      "--set", f"run_dir={tmp_path / 'run'}")
        out = job.stdout + job.stderr
        assert job.returncode == 0, out[-4000:]
        assert "joined the Ray cluster at 127.0.0.1:" in out, out[-4000:]
        assert f"checkpoints in {tmp_path / 'ckpt'} (no checkpoint yet" in out, out[-4000:]
        assert "done: step 12" in out, out[-4000:]
        assert "succeeded" in out.lower(), out[-4000:]
    # Outside Ray's directories: still there after the cluster is gone.
    assert (tmp_path / "ckpt" / "step-00000012" / "COMMITTED").exists()
    assert (tmp_path / "run" / "events.jsonl").exists()
