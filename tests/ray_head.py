"""A Ray cluster started with the ``ray`` CLI (``ray start --head`` bound to 127.0.0.1, worker
nodes joined to it, optionally inside their own mount namespace), stopped afterwards by its
private temp dir so that other Ray instances on the machine are left alone."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Iterator

import psutil

from elastic_ckpt.train.local import free_port

RAY_CLI = str(Path(sys.executable).with_name("ray"))


def ray_cli(*args: str, timeout: float = 180, env: dict | None = None
            ) -> subprocess.CompletedProcess:
    # This variable set to 0 forbids worker nodes; 1 allows them (Linux allows by default).
    return subprocess.run([RAY_CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1",
                               **(env or {})})


def processes_of(temp_dir: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        try:
            if any(temp_dir in arg for arg in proc.info["cmdline"] or ()):
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    return found


def stop_ray(temp_dir: str) -> None:
    """Stop the Ray started with ``temp_dir`` and only it (``ray stop`` stops every Ray)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        procs = processes_of(temp_dir)
        for proc in procs:
            try:
                proc.send_signal(sig)
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(procs, timeout=wait_s)
    time.sleep(0.5)


@dataclasses.dataclass
class RayHead:
    temp_dir: str
    port: int
    dashboard_port: int

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add_node(self, num_cpus: int = 1, prefix: list[str] = ()) -> subprocess.Popen:
        """Join a worker node (``prefix`` wraps the ``ray start`` command, e.g. in
        ``unshare``); returns once the cluster lists it."""
        before = self.alive_nodes()
        cmd = [*prefix, RAY_CLI, "start", f"--address={self.address}",
               "--node-ip-address=127.0.0.1", f"--num-cpus={num_cpus}", "--block",
               "--disable-usage-stats"]
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1"})
        deadline = time.time() + 120
        while self.alive_nodes() <= before:
            if proc.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"worker node did not join (exit {proc.poll()})")
            time.sleep(1)
        return proc

    def alive_nodes(self) -> int:
        out = ray_cli("list", "nodes", f"--address={self.address}", "--format=json",
                      timeout=60)
        return out.stdout.count('"ALIVE"')


@contextlib.contextmanager
def ray_head(num_cpus: int = 2) -> Iterator[RayHead]:
    """``ray start --head`` on 127.0.0.1 with a private temp dir; everything it (and any node
    joined to it) started is stopped on exit, and the test fails if a process is left."""
    temp_dir = tempfile.mkdtemp(prefix="rayjob-", dir="/tmp")  # short: unix socket paths
    head = RayHead(temp_dir, free_port(), free_port())
    try:
        started = ray_cli("start", "--head", "--node-ip-address=127.0.0.1",
                          f"--port={head.port}", f"--temp-dir={temp_dir}",
                          "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                          f"--dashboard-port={head.dashboard_port}", f"--num-cpus={num_cpus}",
                          "--disable-usage-stats")
        assert started.returncode == 0, started.stderr
        yield head
    finally:
        stop_ray(temp_dir)
        leftover = processes_of(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"Ray processes left behind: {[p.pid for p in leftover]}"
