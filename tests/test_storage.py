"""The storage seam: URIs, atomic writes, ranged reads, listing, deletion — on a local path, a
``file://`` URI and an in-memory pyarrow filesystem (the object-store code path)."""

from __future__ import annotations

import pyarrow.fs as pafs
import pytest

from elastic_ckpt.errors import StorageError
from elastic_ckpt.storage import Storage, join_uri, resolve


@pytest.fixture(params=["path", "file_uri", "arrow"])
def store(request, tmp_path) -> Storage:
    if request.param == "path":
        return Storage(str(tmp_path))
    if request.param == "file_uri":
        return Storage(f"file://{tmp_path}")
    s = Storage("mock://bucket/root", filesystem=pafs._MockFileSystem())
    s.makedirs()
    return s


def names(store: Storage, name: str = "") -> list[str]:
    return [n for n, _ in store.listdir(name)]


# -- URIs ---------------------------------------------------------------------------------------
def test_resolve_local_forms(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    for uri in ("rel/x", f"{tmp_path}/rel/x", f"file://{tmp_path}/rel/x"):
        fs, path = resolve(uri)
        assert isinstance(fs, pafs.LocalFileSystem) and path == f"{tmp_path}/rel/x"


@pytest.mark.parametrize("bad", ["", None, 3])
def test_resolve_rejects_non_uris(bad) -> None:
    with pytest.raises(StorageError, match="non-empty string"):
        resolve(bad)


def test_resolve_unknown_scheme_is_a_storage_error() -> None:
    with pytest.raises(StorageError, match="nosuchscheme://x"):
        resolve("nosuchscheme://x")


@pytest.mark.parametrize(("uri", "parts", "want"), [
    ("s3://b/x", ("a",), "s3://b/x/a"),
    ("s3://b/x/", ("/a/", "b"), "s3://b/x/a/b"),
    ("/tmp/r", ("", "step-1"), "/tmp/r/step-1"),
    ("file:///tmp/r", (), "file:///tmp/r"),
    ("s3://b/x/?region=eu&scheme=http", ("step-1", "f"), "s3://b/x/step-1/f?region=eu&scheme=http"),
    ("/tmp/what?", ("a",), "/tmp/what?/a"),  # a local path may contain '?'
])
def test_join_uri(uri, parts, want) -> None:
    assert join_uri(uri, *parts) == want


def test_child_of_relative_root_does_not_follow_chdir(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    store = Storage("rel")
    (tmp_path / "elsewhere").mkdir()
    monkeypatch.chdir(tmp_path / "elsewhere")
    child = store.child("step-00000001")
    child.makedirs()
    child.write_atomic("f", b"x")
    assert (tmp_path / "rel" / "step-00000001" / "f").read_bytes() == b"x"
    assert not (tmp_path / "elsewhere" / "rel").exists()


def test_child_shares_root_and_filesystem(store) -> None:
    child = store.child("a")
    assert child.fs is store.fs and child.uri == store.uri_of("a")
    child.makedirs()
    child.write_atomic("f", b"abc")
    assert store.read_bytes("a/f") == b"abc" and store.is_dir("a")


# -- writes -------------------------------------------------------------------------------------
def test_write_atomic_leaves_no_temp_files(store) -> None:
    store.makedirs("d")
    store.write_atomic("d/manifest.json", b"first")
    store.write_atomic("d/manifest.json", b"second, longer")
    assert names(store, "d") == ["manifest.json"]
    assert store.read_bytes("d/manifest.json") == b"second, longer"
    assert store.size("d/manifest.json") == len(b"second, longer")


def test_write_atomic_into_missing_directory_fails_cleanly(store) -> None:
    with pytest.raises(StorageError, match="nodir") as err:
        store.write_atomic("nodir/x", b"1")
    assert err.value.missing
    assert names(store) == []


def test_open_write_streams_and_tracks_offset(store) -> None:
    with store.open_write("data.bin") as out:
        assert out.write(b"abc") == 3
        out.write(memoryview(bytearray(b"defg")))
        assert out.offset == 7
    assert store.read_bytes("data.bin") == b"abcdefg"


def test_open_write_removes_partial_file_on_error(store) -> None:
    with pytest.raises(ValueError, match="boom"):
        with store.open_write("data.bin") as out:
            out.write(b"partial")
            raise ValueError("boom")
    assert not store.exists("data.bin") and names(store) == []


def test_open_write_into_missing_directory_is_a_storage_error(store) -> None:
    with pytest.raises(StorageError, match="nodir") as err:
        with store.open_write("nodir/data.bin"):
            pass
    assert err.value.missing


# -- reads --------------------------------------------------------------------------------------
def test_read_into_is_short_only_at_end_of_file(store) -> None:
    store.write_atomic("f", bytes(range(10)))
    with store.open_read("f") as f:
        buf = bytearray(4)
        assert f.read_into(3, buf) == 4 and bytes(buf) == bytes([3, 4, 5, 6])
        buf = bytearray(b"\xff" * 8)
        assert f.read_into(6, buf) == 4 and bytes(buf[:4]) == bytes([6, 7, 8, 9])
        assert bytes(buf[4:]) == b"\xff" * 4  # untouched past the end
        assert f.read_into(10, bytearray(3)) == 0
        assert f.read_into(50, bytearray(3)) == 0
        assert f.read_into(0, bytearray(0)) == 0


def test_missing_files_are_storage_errors_naming_the_uri(store) -> None:
    with pytest.raises(StorageError, match="it does not exist") as err:
        store.read_bytes("absent.bin")
    assert err.value.missing and err.value.path == store.uri_of("absent.bin")
    with pytest.raises(StorageError) as err:
        with store.open_read("absent.bin"):
            pass
    assert err.value.missing and "absent.bin" in str(err.value)
    assert store.size("absent.bin") is None
    assert not store.exists("absent.bin") and not store.is_dir("absent.bin")


# -- listing and deletion -----------------------------------------------------------------------
def test_listdir_sorted_with_kinds_and_missing_is_empty(store) -> None:
    store.makedirs("b/inner")
    store.write_atomic("c.txt", b"")
    store.write_atomic("a.txt", b"")
    assert store.listdir() == [("a.txt", False), ("b", True), ("c.txt", False)]
    assert store.listdir("b") == [("inner", True)]
    assert store.listdir("missing") == []
    assert store.listdir("missing/deeper") == []


def test_makedirs_is_idempotent(store) -> None:
    store.makedirs("x/y/z")
    store.makedirs("x/y/z")
    assert store.is_dir("x/y/z") and store.exists("x")


def test_remove_tree(store) -> None:
    store.makedirs("gone/sub")
    store.write_atomic("gone/sub/f", b"1")
    store.write_atomic("gone/g", b"2")
    store.makedirs("kept")
    store.remove_tree("gone")
    assert names(store) == ["kept"]
    store.remove_tree("gone")  # absent is fine
    store.remove_tree("never-existed")
    assert names(store) == ["kept"]
