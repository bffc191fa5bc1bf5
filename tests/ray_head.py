"""A Ray cluster started with the ``ray`` CLI (``ray start --head`` bound to 127.0.0.1, worker
nodes joined to it, optionally inside their own mount namespace), stopped afterwards by its
private temp dir so that other Ray instances on the machine are left alone."""

from __future__ import annotations

import contextlib
import dataclasses
import json
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
    # 0 keeps every Ray process on 127.0.0.1 (Ray's single-machine mode); it also makes
    # `ray start --address` refuse to join, so worker nodes start through ``add_node``.
    return subprocess.run([RAY_CLI, *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
                               **(env or {})})


def processes_of(temp_dir: str, *markers: str) -> list[psutil.Process]:
    """The processes whose command line names ``temp_dir`` (or one of ``markers``, e.g. the
    GCS address Ray's client server is given), and their descendants: Ray's agents retitle
    themselves (``ray::DashboardAgent``), so only their parent raylet names the temp dir.
    Never this process."""
    found: dict[int, psutil.Process] = {}
    for proc in psutil.process_iter(["cmdline"]):
        try:
            args = proc.info["cmdline"] or ()
            if any(m in arg for arg in args for m in (temp_dir, *markers)):
                found[proc.pid] = proc
                for child in proc.children(recursive=True):
                    found.setdefault(child.pid, child)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    found.pop(os.getpid(), None)
    return list(found.values())


def stop_ray(temp_dir: str, *markers: str) -> None:
    """Stop the Ray started with ``temp_dir`` and only it (``ray stop`` stops every Ray)."""
    for sig, wait_s in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
        procs = processes_of(temp_dir, *markers)
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
    nodes: list = dataclasses.field(default_factory=list)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    @property
    def dashboard(self) -> str:
        return f"http://127.0.0.1:{self.dashboard_port}"

    def add_node(self, num_cpus: int = 1, prefix: list[str] = ()) -> subprocess.Popen:
        """Join a worker node on 127.0.0.1, run by this file as a script (``prefix`` wraps
        it, e.g. in ``unshare``); returns once the cluster lists it. Stopped with the head."""
        before = self.alive_nodes()
        proc = subprocess.Popen([*prefix, sys.executable, __file__, self.address, str(num_cpus)],
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0"})
        self.nodes.append(proc)
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
        for node in head.nodes:  # SIGTERM: the node script shuts its Ray processes down
            node.terminate()
            try:
                node.wait(30)
            except subprocess.TimeoutExpired:
                node.kill()
        gcs = f"--address={head.address}"  # Ray's client server names only that
        stop_ray(temp_dir, gcs)
        leftover = processes_of(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"Ray processes left behind: {[p.pid for p in leftover]}"



@contextlib.contextmanager
def fake_autoscaling_head(max_nodes: int, cpus_per_node: int = 1,
                          idle_timeout_s: float = 6.0) -> Iterator[RayHead]:
    """``RAY_FAKE_CLUSTER=1 ray start --head --autoscaling-config=...`` on 127.0.0.1: Ray's
    real autoscaler with its ``fake_multinode`` provider, which launches up to ``max_nodes``
    worker nodes of ``cpus_per_node`` CPUs as local processes when resources are requested and
    removes them when idle. The head has 0 CPUs and no worker node at the start. Stopped by
    its private temp dir; the test fails if a process is left."""
    temp_dir = tempfile.mkdtemp(prefix="rayfake-", dir="/tmp")
    head = RayHead(temp_dir, free_port(), free_port())
    worker = {"resources": {"CPU": cpus_per_node}, "node_config": {}, "min_workers": 0,
              "max_workers": max_nodes}
    config = {
        "cluster_name": "fake", "max_workers": max_nodes, "upscaling_speed": 10.0,
        "idle_timeout_minutes": idle_timeout_s / 60,
        "provider": {"type": "fake_multinode", "gcs_address": head.address,
                     "disable_launch_config_check": True, "disable_node_updaters": True},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": 0}, "node_config": {}, "max_workers": 0},
            "ray.worker.cpu": worker},
        "head_node_type": "ray.head.default",
        "auth": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "initialization_commands": [],
        "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }
    path = os.path.join(temp_dir, "autoscaler.json")
    with open(path, "w") as f:
        json.dump(config, f)
    try:
        started = ray_cli("start", "--head", "--node-ip-address=127.0.0.1",
                          f"--port={head.port}", f"--temp-dir={temp_dir}",
                          "--include-dashboard=false", "--num-cpus=0",
                          f"--autoscaling-config={path}", "--disable-usage-stats",
                          env={"RAY_FAKE_CLUSTER": "1"})
        assert started.returncode == 0, started.stderr
        yield head
    finally:
        gcs = f"--address={head.address}"  # Ray's client server names only that
        stop_ray(temp_dir, gcs)
        leftover = processes_of(temp_dir, gcs)
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert not leftover, f"Ray processes left behind: {[p.pid for p in leftover]}"

def _run_worker_node(address: str, num_cpus: int) -> None:
    """A Ray worker node joined to ``address``, as ``ray.cluster_utils.Cluster.add_node``
    starts one, until SIGTERM."""
    import ray._private.node  # noqa: PLC0415
    import ray._private.parameter  # noqa: PLC0415

    params = ray._private.parameter.RayParams(
        gcs_address=address, node_ip_address="127.0.0.1", num_cpus=num_cpus, num_gpus=0,
        object_store_memory=150 * 1024 * 1024, min_worker_port=0, max_worker_port=0,
        include_log_monitor=False, node_manager_port=0)
    params.dashboard_agent_listen_port = None
    node = ray._private.node.Node(params, head=False, shutdown_at_exit=True, spawn_reaper=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    try:
        while True:
            time.sleep(3600)
    finally:
        node.kill_all_processes(check_alive=False, allow_graceful=True)


if __name__ == "__main__":
    _run_worker_node(sys.argv[1], int(sys.argv[2]))
