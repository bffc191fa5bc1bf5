"""Which Ray a run uses, and saying so: join the cluster the address names (Ray's convention
when none is given: ``RAY_ADDRESS``, else a cluster ``ray start`` left running on this machine)
or start a local one."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import threading
from typing import Iterator

import ray

from elastic_ckpt.errors import ConfigError

ADDRESS_HELP = ("local: always start a local Ray; auto: join the running cluster (fail if "
                "none); HOST:PORT or ray://...: join that cluster; default: Ray's convention "
                "(RAY_ADDRESS, else a cluster `ray start` runs on this machine, else a local "
                "Ray)")


@dataclasses.dataclass(frozen=True)
class RaySession:
    started: bool
    """True: this process started a local Ray (it ends with the process)."""
    address: str
    nodes: int
    cpus: float
    gpus: float
    dashboard_url: str | None = None
    note: str = ""
    """Why this Ray was chosen, when that is not obvious."""

    def describe(self) -> str:
        gpus = f", {self.gpus:g} GPUs" if self.gpus else ""
        dashboard = f"; dashboard {self.dashboard_url}" if self.dashboard_url else ""
        if self.started:
            note = f"; {self.note}" if self.note else ""
            return f"started a local Ray ({self.cpus:g} CPUs{gpus}{dashboard}{note})"
        return (f"joined the Ray cluster at {self.address} ({self.nodes} node"
                f"{'s' if self.nodes != 1 else ''}, {self.cpus:g} CPUs"
                f"{gpus or ', 0 GPUs'}{dashboard})")


def connect(address: str | None = None) -> RaySession:
    """Connect this process to Ray as ``address`` says (see ``ADDRESS_HELP``); a process
    already connected keeps its connection. A SIGTERM handler the caller installed stays
    (``ray.init`` replaces it with its own)."""
    note = ""
    if not ray.is_initialized():
        with _keeping_sigterm_handler():
            note = _init(address)
    return dataclasses.replace(current_session(), note=note)


@contextlib.contextmanager
def _keeping_sigterm_handler() -> Iterator[None]:
    """Put back a Python SIGTERM handler (``jobs/train.py``'s graceful stop) that ``ray.init``
    replaced; Ray's own cleanup at exit still runs (atexit)."""
    main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(handler):
            signal.signal(signal.SIGTERM, handler)


def _init(address: str | None) -> str:
    """``ray.init`` as ``address`` says; returns why this Ray was chosen when not obvious."""
    note = ""
    local = {"include_dashboard": True, "dashboard_host": "127.0.0.1",
             "_node_ip_address": "127.0.0.1"}
    try:
        if address == "local":
            ray.init(address="local", log_to_driver=True, **local)
        elif address is None:
            joining = bool(os.environ.get("RAY_ADDRESS"))
            stale = None if joining else _stale_local_address()
            if stale:  # Ray would wait minutes for a cluster that is gone: start one
                note = (f"the cluster `ray start` last ran on this machine ({stale}) does "
                        "not answer")
            ray.init(address="local" if stale else None, log_to_driver=True,
                     **({} if joining else local))
        else:
            ray.init(address=address, log_to_driver=True)
    except ConnectionError as exc:
        raise ConfigError(f"cannot join the Ray cluster at {address or 'RAY_ADDRESS'}: "
                          f"{exc}. Check the address, or use --ray-address local to start "
                          "a local Ray.", field="ray_address") from None
    return note


def _stale_local_address() -> str | None:
    """The address in Ray's ``ray_current_cluster`` file when nothing listens there (a cluster
    that ended without removing it), else None."""
    try:
        address = ray._private.utils.read_ray_address()  # noqa: SLF001
        host, _, port = (address or "").rpartition(":")
        if not host:
            return None
        with socket.create_connection((host, int(port)), timeout=2.0):
            return None
    except (OSError, ValueError):
        return address or None
    except Exception:  # noqa: BLE001 - Ray internals moved: keep Ray's own behaviour
        return None


def current_session() -> RaySession:
    node = getattr(ray._private.worker, "_global_node", None)  # noqa: SLF001
    started = bool(getattr(node, "head", False))
    ctx = ray.get_runtime_context()
    resources = ray.cluster_resources()
    alive = [n for n in ray.nodes() if n.get("Alive")]
    dashboard = None
    try:
        dashboard = ray._private.worker.get_dashboard_url() or None  # noqa: SLF001
    except Exception:  # noqa: BLE001 - no dashboard on this cluster
        pass
    if dashboard and "://" not in dashboard:
        dashboard = f"http://{dashboard}"
    return RaySession(started=started, address=ctx.gcs_address, nodes=len(alive),
                      cpus=resources.get("CPU", 0.0), gpus=resources.get("GPU", 0.0),
                      dashboard_url=dashboard)
