"""``ray job submit --working-dir . -- python jobs/train.py`` against a ``ray start --head``
bound to 127.0.0.1; Ray is stopped afterwards."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    ray_cli = str(Path(sys.executable).with_name("ray"))
    return subprocess.run([ray_cli, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})


def test_ray_job_submit_default_job(tmp_path):
    port, dashboard = _free_port(), _free_port()
    started = _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                   "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={dashboard}", "--num-cpus=2", "--disable-usage-stats")
    assert started.returncode == 0, started.stderr
    try:
        excludes = json.dumps({"excludes": [".git", "checkpoints", "runs", "*.egg-info"]})
        job = _ray("job", "submit", f"--address=http://127.0.0.1:{dashboard}",
                   f"--working-dir={REPO}", f"--runtime-env-json={excludes}", "--",
                   "python", "jobs/train.py", "--set", "max_steps=12",
                   "--set", f"checkpoint.uri={tmp_path / 'ckpt'}",
                   "--set", f"run_dir={tmp_path / 'run'}", timeout=420)
        out = job.stdout + job.stderr
        assert job.returncode == 0, out[-4000:]
        assert "done: step 12" in out, out[-4000:]
        assert "succeeded" in out.lower(), out[-4000:]
        assert (tmp_path / "ckpt" / "step-00000012" / "COMMITTED").exists()
    finally:
        stopped = _ray("stop", "--force", timeout=120)
        assert stopped.returncode == 0, stopped.stderr
