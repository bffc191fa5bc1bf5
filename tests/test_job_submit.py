"""``ray job submit --working-dir . -- python jobs/train.py`` against a ``ray start --head``
bound to 127.0.0.1. Afterwards exactly that Ray is stopped (its processes are found by its
private temp dir), so other Ray instances on the machine are left alone."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import pytest

from elastic_ckpt.train.local import free_port

REPO = Path(__file__).resolve().parents[1]
pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _ray(*args: str, timeout: float = 180) -> subprocess.CompletedProcess:
    ray_cli = str(Path(sys.executable).with_name("ray"))
    return subprocess.run([ray_cli, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})


def _processes_of(temp_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def _stop_ray(temp_dir: str) -> None:
    """Stop the Ray started with ``temp_dir`` and only it (``ray stop`` stops every Ray)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        procs = _processes_of(temp_dir)
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=wait_s)
    time.sleep(0.5)


def test_ray_job_submit_default_job(tmp_path):
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: unix socket paths
    port, dashboard = free_port(), free_port()
    try:
        started = _ray("start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}",
                       f"--temp-dir={temp_dir}", "--include-dashboard=true",
                       "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                       "--num-cpus=2", "--disable-usage-stats")
        assert started.returncode == 0, started.stderr
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
        _stop_ray(temp_dir)
        leftover = _processes_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"Ray processes left behind: {[p.pid for p in leftover]}"
