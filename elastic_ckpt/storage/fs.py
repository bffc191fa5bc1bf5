"""URI -> filesystem resolution and the small set of operations the checkpoint layer needs.

Local paths take a fast, durable path (``os.pwritev``/``os.preadv`` straight from/into caller
buffers, ``fsync`` of files and directories, atomic ``rename``). Every other URI goes through
``pyarrow.fs`` (S3, GCS, HDFS, ...), where an object becomes visible atomically when its
stream is closed, so "write then rename" degrades to "write". Reads from object stores are
retried with backoff a bounded number of times (``retrying``); writes are not (a save that
fails is reported and the next one tries again).
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import time
import uuid
from contextlib import contextmanager
from typing import Callable, Iterator, TypeVar

import pyarrow.fs as pafs

from elastic_ckpt.errors import StorageError

log = logging.getLogger(__name__)
T = TypeVar("T")
_LOCAL_SCHEMES = ("file://",)


def resolve(uri: str) -> tuple[pafs.FileSystem, str]:
    """Map a URI or local path to ``(pyarrow filesystem, path within it)``.

    Plain paths (absolute or relative) and ``file://`` URIs give a ``LocalFileSystem`` and an
    absolute path; anything else is handed to ``pyarrow.fs.FileSystem.from_uri``.
    """
    if not isinstance(uri, str) or not uri:
        raise StorageError(f"storage URI must be a non-empty string, got {uri!r}", uri=uri)
    if "://" not in uri:
        return pafs.LocalFileSystem(), os.path.abspath(uri)
    if uri.startswith(_LOCAL_SCHEMES):
        return pafs.LocalFileSystem(), os.path.abspath(uri[len("file://"):])
    try:
        return pafs.FileSystem.from_uri(uri)
    except Exception as exc:  # pyarrow raises ArrowInvalid / OSError variants
        raise StorageError(
            f"cannot open storage URI {uri!r}: {exc}. Check the scheme and credentials.", uri=uri
        ) from exc


READ_ATTEMPTS = 4
"""Object stores: a read (stat, list, read) that fails, other than for a missing file, is
tried this many times in all, waiting ``READ_BACKOFF_S`` and then twice as long each time
(0.5 + 1 + 2 s), each retry logged; the last error says how many attempts were made."""
READ_BACKOFF_S = 0.5


def retrying(what: str, fn: Callable[[], T], remote: bool = True) -> T:
    """``fn()``, retried with backoff on a ``StorageError`` that is not a missing file when
    ``remote`` (an object store: outages are transient there; a local error is not retried).
    ``what`` names the read in the log lines."""
    attempts = READ_ATTEMPTS if remote else 1
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except StorageError as exc:
            if getattr(exc, "missing", False) or attempt == attempts:
                if attempt == 1:
                    raise
                raise StorageError(f"{exc.message} (after {attempt} attempts)",
                                   **exc.details) from exc
            delay = READ_BACKOFF_S * 2 ** (attempt - 1)
            log.warning("%s failed (attempt %d of %d): %s; retrying in %.1f s", what, attempt,
                        attempts, exc, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def join_uri(uri: str, *parts: str) -> str:
    """Join path parts onto a URI with '/', whatever the scheme; a query string
    (``s3://b/x?endpoint_override=...``) stays at the end."""
    base, sep, query = uri.partition("?") if "://" in uri else (uri, "", "")
    out = base.rstrip("/")
    for part in parts:
        if part:
            out = f"{out}/{part.strip('/')}"
    return f"{out}{sep}{query}"


class Storage:
    """A root URI and its filesystem. Every ``name`` argument is relative to the root.

    Thread-safe for concurrent reads and for writes to distinct names.
    """

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None) -> None:
        if filesystem is None:
            filesystem, root = resolve(uri)
        else:
            root = uri.split("://", 1)[-1] if "://" in uri else uri
        self.uri = uri.rstrip("/") if len(uri) > 1 else uri
        self.fs = filesystem
        self.root = root.rstrip("/") if len(root) > 1 else root
        self.is_local = isinstance(filesystem, pafs.LocalFileSystem)

    def __repr__(self) -> str:
        return f"Storage({self.uri!r})"

    def child(self, name: str) -> "Storage":
        # The child's path is derived from ours, not re-parsed from its URI: a relative local
        # root must not follow later chdirs, and URIs may carry a query (s3://b/x?region=..).
        child = Storage(join_uri(self.uri, name), self.fs)
        child.root = join_uri(self.root, name)
        return child

    def path(self, name: str = "") -> str:
        return join_uri(self.root, name) if name else self.root

    def uri_of(self, name: str = "") -> str:
        return join_uri(self.uri, name) if name else self.uri

    # -- metadata ---------------------------------------------------------------------------
    def exists(self, name: str = "") -> bool:
        if self.is_local:
            return os.path.exists(self.path(name))
        return self._info(name).type != pafs.FileType.NotFound

    def is_dir(self, name: str = "") -> bool:
        if self.is_local:
            return os.path.isdir(self.path(name))
        return self._info(name).type == pafs.FileType.Directory

    def size(self, name: str) -> int | None:
        """Size in bytes of a file, or ``None`` if it does not exist."""
        if self.is_local:
            try:
                return os.stat(self.path(name)).st_size
            except FileNotFoundError:
                return None
        info = self._info(name)
        return None if info.type == pafs.FileType.NotFound else info.size

    def listdir(self, name: str = "") -> list[tuple[str, bool]]:
        """``(entry name, is_dir)`` for each direct child, sorted by name; [] if absent."""
        return retrying(f"listing {self.uri_of(name)}", lambda: self._listdir(name),
                        remote=not self.is_local)

    def _listdir(self, name: str) -> list[tuple[str, bool]]:
        try:
            if self.is_local:
                with os.scandir(self.path(name)) as it:
                    entries = [(e.name, e.is_dir()) for e in it]
            else:
                sel = pafs.FileSelector(self.path(name), allow_not_found=True)
                entries = [
                    (i.base_name, i.type == pafs.FileType.Directory)
                    for i in self.fs.get_file_info(sel)
                ]
        except FileNotFoundError:
            return []
        except OSError as exc:
            raise self._error("list", name, exc) from exc
        return sorted(entries)

    def _info(self, name: str) -> pafs.FileInfo:
        return retrying(f"stat of {self.uri_of(name)}", lambda: self._info_once(name))

    def _info_once(self, name: str) -> pafs.FileInfo:
        try:
            return self.fs.get_file_info(self.path(name))
        except OSError as exc:
            raise self._error("stat", name, exc) from exc

    # -- mutation ---------------------------------------------------------------------------
    def makedirs(self, name: str = "") -> None:
        try:
            if self.is_local:
                os.makedirs(self.path(name), exist_ok=True)
            else:
                self.fs.create_dir(self.path(name), recursive=True)
        except OSError as exc:
            raise self._error("create directory", name, exc) from exc

    def remove_tree(self, name: str) -> None:
        """Delete a directory and everything under it; absent is fine."""
        if not self.exists(name):
            return
        try:
            self.fs.delete_dir(self.path(name))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._error("delete", name, exc) from exc

    def remove(self, name: str) -> None:
        """Delete one file, durably (local: the directory is fsynced); absent is fine."""
        try:
            if self.is_local:
                os.remove(self.path(name))
                _fsync_dir(os.path.dirname(self.path(name)))
            else:
                self.fs.delete_file(self.path(name))
        except FileNotFoundError:
            return
        except OSError as exc:
            raise self._error("delete", name, exc) from exc

    def move(self, src: str, dst: str) -> None:
        """Rename ``src`` to ``dst`` (replacing it). Local: ``os.replace`` plus a directory
        fsync; object stores: the filesystem's move (a copy then a delete)."""
        try:
            if self.is_local:
                os.replace(self.path(src), self.path(dst))
                _fsync_dir(os.path.dirname(self.path(dst)))
            else:
                self.fs.move(self.path(src), self.path(dst))
        except OSError as exc:
            raise self._error("move", src, exc) from exc

    def write_atomic(self, name: str, data: bytes) -> None:
        """Write ``data`` so readers see either nothing or all of it, durably.

        Local: temp file in the same directory, fsync, rename, fsync the directory.
        Object stores: a single PUT, which is atomic.
        """
        if not self.is_local:
            with self.open_write(name) as out:
                out.write(data)
            return
        final = self.path(name)
        tmp = f"{final}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, final)
            _fsync_dir(os.path.dirname(final))
        except OSError as exc:
            _silent_remove(tmp)
            raise self._error("write", name, exc) from exc

    @contextmanager
    def open_write(self, name: str, *,
                   in_place: bool = False) -> Iterator[_LocalWriter | _ArrowWriter]:
        """A sequential writer; the file is durable (fsynced / uploaded) when the block exits
        without error. On error the partial file is removed.

        ``in_place`` (local only): ``name`` exists and its blocks are allocated; overwrite it
        from byte 0 without truncating first, and truncate it to the bytes written before
        the fsync (cheaper than allocating a new file on most local filesystems)."""
        try:
            writer = (_LocalWriter(self.path(name), in_place=in_place) if self.is_local
                      else _ArrowWriter(self, name))
        except OSError as exc:
            raise self._error("open for writing", name, exc) from exc
        try:
            yield writer
            writer.close(durable=True)
        except BaseException as exc:
            writer.abort()
            if isinstance(exc, OSError) and not isinstance(exc, StorageError):
                raise self._error("write", name, exc) from exc
            raise

    # -- reads ------------------------------------------------------------------------------
    def read_bytes(self, name: str) -> bytes:
        return retrying(f"reading {self.uri_of(name)}", lambda: self._read_bytes(name),
                        remote=not self.is_local)

    def _read_bytes(self, name: str) -> bytes:
        try:
            if self.is_local:
                with open(self.path(name), "rb") as f:
                    return f.read()
            with self.fs.open_input_stream(self.path(name)) as f:
                return f.read()
        except OSError as exc:
            raise self._error("read", name, exc) from exc

    @contextmanager
    def open_read(self, name: str) -> Iterator[_LocalReader | _ArrowReader]:
        """A random-access reader for ranged reads into caller buffers."""
        try:
            reader = _LocalReader(self.path(name)) if self.is_local else _ArrowReader(
                self.fs.open_input_file(self.path(name))
            )
        except OSError as exc:
            raise self._error("open", name, exc) from exc
        try:
            yield reader
        except OSError as exc:  # a read that failed (EIO, a directory where a file was)
            if isinstance(exc, StorageError):
                raise
            raise self._error("read", name, exc) from exc
        finally:
            reader.close()

    def _error(self, what: str, name: str, exc: BaseException) -> StorageError:
        missing = isinstance(exc, FileNotFoundError)
        uri = self.uri_of(name)
        hint = "it does not exist" if missing else str(exc)
        return StorageError(f"cannot {what} {uri}: {hint}", path=uri, missing=missing)


class _LocalWriter:
    def __init__(self, path: str, in_place: bool = False) -> None:
        self.path = path
        self.in_place = in_place
        self.fd = os.open(path, os.O_WRONLY | os.O_CREAT | (0 if in_place else os.O_TRUNC),
                          0o644)
        self.offset = 0
        self._synced = False

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        n = len(view)
        while view:
            view = view[os.write(self.fd, view):]
        self.offset += n
        self._synced = False
        return n

    def sync(self) -> None:
        """Make what was written so far durable (``close`` then skips its fsync). Releases the
        GIL for the device's time: a caller may compute on another thread meanwhile."""
        if self.in_place:
            os.ftruncate(self.fd, self.offset)  # drop what a longer old file had beyond
        os.fsync(self.fd)
        self._synced = True

    def close(self, durable: bool) -> None:
        if self.fd < 0:
            return
        try:
            if self.in_place and not self._synced:
                os.ftruncate(self.fd, self.offset)  # drop what a longer old file had beyond
            if durable and not self._synced:
                os.fsync(self.fd)
        finally:
            os.close(self.fd)
            self.fd = -1
        if durable:
            _fsync_dir(os.path.dirname(self.path))

    def abort(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        _silent_remove(self.path)


class _ArrowWriter:
    def __init__(self, storage: Storage, name: str) -> None:
        self.storage, self.name = storage, name
        self.stream = storage.fs.open_output_stream(storage.path(name))
        self.offset = 0

    def write(self, data) -> int:
        view = memoryview(data).cast("B")
        self.stream.write(view)
        self.offset += len(view)
        return len(view)

    def sync(self) -> None:
        """Nothing to do early: an object becomes durable when ``close`` completes it."""

    def close(self, durable: bool) -> None:
        if not self.stream.closed:
            self.stream.close()

    def abort(self) -> None:
        try:
            if not self.stream.closed:
                self.stream.close()
            self.storage.fs.delete_file(self.storage.path(self.name))
        except OSError:
            pass


class _LocalReader:
    def __init__(self, path: str) -> None:
        self.fd = os.open(path, os.O_RDONLY)
        if not stat.S_ISREG(os.fstat(self.fd).st_mode):
            os.close(self.fd)
            raise IsADirectoryError(errno.EISDIR, "not a regular file", path)

    def read_into(self, offset: int, buf) -> int:
        """Fill ``buf`` from ``offset``; returns the bytes read (short only at end of file)."""
        view = memoryview(buf).cast("B")
        total = 0
        while total < len(view):
            n = os.preadv(self.fd, [view[total:]], offset + total)
            if n == 0:
                break
            total += n
        return total

    def close(self) -> None:
        os.close(self.fd)


class _ArrowReader:
    def __init__(self, handle) -> None:
        self.handle = handle

    def read_into(self, offset: int, buf) -> int:
        view = memoryview(buf).cast("B")
        # Arrow refuses reads past the end; the contract is a short read there, like pread.
        nbytes = max(0, min(len(view), self.handle.size() - offset))
        if nbytes == 0:
            return 0
        data = self.handle.read_at(nbytes, offset)
        n = len(data)
        view[:n] = memoryview(data)
        return n

    def close(self) -> None:
        self.handle.close()


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _silent_remove(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
