"""Which Ray a run uses, in words."""

from __future__ import annotations

import signal
import socket
import sys

from elastic_ckpt.trainer import ray_session
from elastic_ckpt.trainer.ray_session import RaySession


def test_describe_started_and_joined():
    started = RaySession(True, "127.0.0.1:6379", 1, 2, 0, "http://127.0.0.1:8265")
    assert started.describe() == "started a local Ray (2 CPUs; dashboard http://127.0.0.1:8265)"
    joined = RaySession(False, "10.0.0.1:6379", 3, 96, 8)
    assert joined.describe() == "joined the Ray cluster at 10.0.0.1:6379 (3 nodes, 96 CPUs, 8 GPUs)"
    one = RaySession(False, "10.0.0.1:6379", 1, 4, 0)
    assert one.describe() == "joined the Ray cluster at 10.0.0.1:6379 (1 node, 4 CPUs, 0 GPUs)"


def test_a_stale_ray_address_file_is_recognised(monkeypatch):
    with socket.socket() as s:  # a port nothing listens on once closed
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setattr(ray_session.ray._private.utils, "read_ray_address",
                        lambda temp_dir=None: f"127.0.0.1:{port}")
    assert ray_session._stale_local_address() == f"127.0.0.1:{port}"
    with socket.socket() as live:
        live.bind(("127.0.0.1", 0))
        live.listen()
        monkeypatch.setattr(ray_session.ray._private.utils, "read_ray_address",
                            lambda temp_dir=None: f"127.0.0.1:{live.getsockname()[1]}")
        assert ray_session._stale_local_address() is None
    monkeypatch.setattr(ray_session.ray._private.utils, "read_ray_address",
                        lambda temp_dir=None: None)
    assert ray_session._stale_local_address() is None


def test_connect_keeps_the_callers_sigterm_handler(monkeypatch):
    """``ray.init`` installs its own SIGTERM handler (``sys.exit``); the driver's graceful
    stop (``jobs/train.py``) must survive it."""
    def fake_init(**kwargs):  # what ray.init does to the handler
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))

    monkeypatch.setattr(ray_session.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray_session.ray, "init", fake_init)
    monkeypatch.setattr(ray_session, "current_session",
                        lambda: RaySession(True, "127.0.0.1:6379", 1, 2, 0))

    def mine(signum, frame):
        pass

    before = signal.signal(signal.SIGTERM, mine)
    try:
        assert ray_session.connect("local").started
        assert signal.getsignal(signal.SIGTERM) is mine
    finally:
        signal.signal(signal.SIGTERM, before)
