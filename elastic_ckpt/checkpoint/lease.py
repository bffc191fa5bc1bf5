"""One writer per checkpoint root: a lease object, ``<root>/.lease``.

A job takes the lease before it trains (``RootLease.acquire``) and renews it every quarter of
``timeout_s`` from a thread (``LeaseKeeper``); it deletes it when the run ends. A second job on
the same root is refused with an error that names the holder (its job name, host, pid, and how
fresh its heartbeat is). A lease whose heartbeat is older than ``timeout_s``, or whose holder
ran on this host under a pid that no longer exists, is taken over, and the takeover is
logged. A holder that finds at its next renewal that another job owns the lease has lost it
(it was paused longer than the timeout): ``LeaseKeeper.lost`` says so and the run stops.

The lease is plain JSON written whole (local: temp file and rename; object stores: one PUT),
then read back after a short settle to see who won when two jobs start at the same moment.
Object stores without conditional writes make this best effort for starts within that
settle time, and a renewal racing a takeover (between its read and its write) can put the old
holder back; either way one of the two finds the other's lease at its next renewal and stops.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import socket
import threading
import time
import uuid

from elastic_ckpt.errors import CheckpointLeaseError, StorageError
from elastic_ckpt.storage import Storage

log = logging.getLogger(__name__)

LEASE_FILE = ".lease"
_SETTLE_S = 0.2  # between writing the lease and reading it back


@dataclasses.dataclass(frozen=True)
class LeaseRecord:
    """Who holds a root's lease."""

    owner: str
    """A fresh id per acquisition."""
    job: str
    host: str
    pid: int
    started_unix_s: float
    heartbeat_unix_s: float

    def describe(self, now: float) -> str:
        return (f"job {self.job!r} (host {self.host}, pid {self.pid}, started "
                f"{time.strftime('%Y-%m-%d %H:%M:%S', time.localtime(self.started_unix_s))}, "
                f"last heartbeat {now - self.heartbeat_unix_s:.0f} s ago)")

    def holder_gone(self, now: float, timeout_s: float) -> str | None:
        """Why this lease may be taken over (stale heartbeat, dead pid on this host), or
        None while its holder looks alive."""
        age = now - self.heartbeat_unix_s
        if age > timeout_s:
            return (f"its heartbeat is {age:.0f} s old (more than checkpoint.lease_timeout_s="
                    f"{timeout_s:g})")
        if self.host == socket.gethostname() and not _pid_alive(self.pid):
            return f"its process {self.pid} on this host is gone"
        return None


class RootLease:
    """The lease of checkpoint root ``root`` for this job."""

    def __init__(self, root: Storage | str, job: str, timeout_s: float) -> None:
        self.root = root if isinstance(root, Storage) else Storage(root)
        self.job = job
        self.timeout_s = timeout_s
        self.record: LeaseRecord | None = None

    @property
    def uri(self) -> str:
        return self.root.uri_of(LEASE_FILE)

    def holder(self) -> LeaseRecord | None:
        """The lease as stored (None: no lease, or one that cannot be parsed)."""
        try:
            data = self.root.read_bytes(LEASE_FILE)
        except StorageError as exc:
            if getattr(exc, "missing", False):
                return None
            raise
        try:
            return LeaseRecord(**json.loads(data))
        except (ValueError, TypeError) as exc:
            log.warning("ignoring the unreadable lease %s: %s", self.uri, exc)
            return None

    def acquire(self) -> LeaseRecord:
        """Take the lease, or raise ``CheckpointLeaseError`` naming the job that holds it."""
        now = time.time()
        current = self.holder()
        if current is not None:
            why = current.holder_gone(now, self.timeout_s)
            if why is None:
                raise self._refused(current, now)
            log.warning("taking over the lease of %s on %s: %s", current.describe(now),
                        self.root.uri, why)
        self.root.makedirs("")
        mine = LeaseRecord(owner=uuid.uuid4().hex, job=self.job, host=socket.gethostname(),
                           pid=os.getpid(), started_unix_s=now, heartbeat_unix_s=now)
        self._write(mine)
        time.sleep(_SETTLE_S)  # another job starting at this moment: the last write wins
        stored = self.holder()
        if stored is None or stored.owner != mine.owner:
            raise self._refused(stored or mine, time.time())
        self.record = mine
        return mine

    def renew(self) -> None:
        """Refresh the heartbeat; raise ``CheckpointLeaseError`` if another job owns it now."""
        if self.record is None:
            raise RuntimeError("renew() before acquire()")
        stored = self.holder()
        now = time.time()
        if stored is not None and stored.owner != self.record.owner:
            raise CheckpointLeaseError(
                f"the lease on {self.root.uri} was taken over by {stored.describe(now)}: this "
                f"job's heartbeat lapsed for longer than checkpoint.lease_timeout_s="
                f"{self.timeout_s:g}. It stops so that two jobs never write checkpoints under "
                "one root.", path=self.uri)
        self.record = dataclasses.replace(self.record, heartbeat_unix_s=now)
        self._write(self.record)

    def release(self) -> None:
        """Delete the lease if this job still holds it (best effort)."""
        if self.record is None:
            return
        try:
            stored = self.holder()
            if stored is not None and stored.owner == self.record.owner:
                self.root.remove(LEASE_FILE)
        except StorageError as exc:
            log.warning("could not release the lease %s: %s", self.uri, exc)
        self.record = None

    def _write(self, record: LeaseRecord) -> None:
        self.root.write_atomic(LEASE_FILE, json.dumps(dataclasses.asdict(record)).encode())

    def _refused(self, holder: LeaseRecord, now: float) -> CheckpointLeaseError:
        return CheckpointLeaseError(
            f"checkpoint root {self.root.uri} is in use by {holder.describe(now)}; two jobs "
            "must not write checkpoints under one root. Give this run its own "
            "checkpoint.uri, or stop the other job. If it is dead on another host, its lease "
            f"expires {max(0.0, self.timeout_s - (now - holder.heartbeat_unix_s)):.0f} s after "
            f"its last heartbeat (checkpoint.lease_timeout_s={self.timeout_s:g}); or delete "
            f"{self.uri}.", path=self.uri, holder=dataclasses.asdict(holder))


class LeaseKeeper:
    """Renews a held lease every ``timeout_s / 4`` on a daemon thread until ``stop``.
    ``lost`` is the error of a renewal that found another owner (then it stops renewing);
    a renewal that fails on storage is retried at the next beat, and logged."""

    def __init__(self, lease: RootLease) -> None:
        self.lease = lease
        self.lost: CheckpointLeaseError | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="elastic-ckpt-lease",
                                        daemon=True)

    def start(self) -> "LeaseKeeper":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=10)
        if self.lost is None:
            self.lease.release()

    def _beat(self) -> None:
        while not self._stop.wait(self.lease.timeout_s / 4):
            try:
                self.lease.renew()
            except CheckpointLeaseError as exc:
                self.lost = exc
                log.error("%s", exc)
                return
            except StorageError as exc:
                log.warning("could not renew the lease %s (retrying): %s", self.lease.uri, exc)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True

