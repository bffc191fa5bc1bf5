"""A real S3 server for tests: moto's, on 127.0.0.1, with test credentials in the environment
(pyarrow reads them as it would for real S3)."""

from __future__ import annotations

import contextlib
from typing import Any, Iterator

import pytest


@contextlib.contextmanager
def moto_s3(bucket: str) -> Iterator[tuple[str, Any]]:
    """Start the server with an empty ``bucket``; yields ``(query, filesystem)``: the URI
    query that points pyarrow at it (``s3://bucket/key?<query>``) and a pyarrow
    ``S3FileSystem`` on it. Stopped, and the environment restored, on exit."""
    moto_server = pytest.importorskip("moto.server", reason="the test extra installs moto")
    pafs = pytest.importorskip("pyarrow.fs")
    env = pytest.MonkeyPatch()
    env.setenv("AWS_ACCESS_KEY_ID", "testing")
    env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        fs = pafs.S3FileSystem(endpoint_override=f"{host}:{port}", scheme="http",
                               region="us-east-1", allow_bucket_creation=True)
        fs.create_dir(bucket)
        yield f"endpoint_override={host}:{port}&scheme=http&region=us-east-1", fs
    finally:
        server.stop()
        env.undo()
