"""Recycled rank files: retention hands a removed checkpoint's data files to the next save,
which overwrites them in place (same inode, no new blocks), truncates them to size, and keeps
every crash guarantee of a new file."""

from __future__ import annotations

import errno
import os
from pathlib import Path
from typing import Any

import pytest
import torch

import ckpt_models as cm
from elastic_ckpt import AppState, CheckpointManager, verify
from elastic_ckpt.checkpoint.manifest import rank_filename, step_dirname
from elastic_ckpt.checkpoint.recycle import POOL_DIR
from elastic_ckpt.errors import StorageError
from elastic_ckpt.storage import Storage
from elastic_ckpt.storage import fs as storage_fs
from elastic_ckpt.train.local import run_ranks


def state_of(model, opt, step: int) -> dict[str, Any]:
    return {"app": AppState(model, opt), "extra": {"step": step}}


def inode(path: Path) -> int:
    return os.stat(path).st_ino


def pooled(root: Path) -> list[str]:
    pool = root / POOL_DIR
    return sorted(os.listdir(pool)) if pool.exists() else []


def load_full(root: str, step: int | None = None) -> dict[str, Any]:
    model, opt = cm.build(seed=999)
    cm.train(model, opt, range(70, 71))
    CheckpointManager(root).load({"app": AppState(model, opt)}, step=step)
    return cm.full_state(model, opt)


@pytest.mark.parametrize("mode", ["save", "async_save"])
def test_retention_recycles_rank_files_in_place(tmp_path, mode) -> None:
    root = str(tmp_path)
    mgr = CheckpointManager(root, keep_last=1)
    model, opt = cm.build(seed=1)

    def save(step: int) -> dict[str, Any]:
        cm.train(model, opt, range(step, step + 1))
        expected = cm.full_state(model, opt)
        if mode == "save":
            mgr.save(step, state_of(model, opt, step))
        else:
            mgr.async_save(step, state_of(model, opt, step)).result(timeout=60)
        return expected

    save(1)
    first = inode(tmp_path / step_dirname(1) / rank_filename(0))
    save(2)
    assert pooled(tmp_path) == [f"{1:012d}-{rank_filename(0)}"]
    second = inode(tmp_path / step_dirname(2) / rank_filename(0))
    expected = save(3)
    assert inode(tmp_path / step_dirname(3) / rank_filename(0)) == first, \
        "step 3 overwrote step 1's file in place"
    assert pooled(tmp_path) == [f"{2:012d}-{rank_filename(0)}"]
    assert [i.step for i in mgr.list()] == [3]
    cm.assert_same(expected, load_full(root))
    verify(mgr.latest().uri)
    save(4)
    assert inode(tmp_path / step_dirname(4) / rank_filename(0)) == second


def test_a_longer_recycled_file_is_truncated_to_what_was_written(tmp_path) -> None:
    root = str(tmp_path)
    mgr = CheckpointManager(root, keep_last=1)
    mgr.save(1, {"t": {"big": torch.arange(200_000, dtype=torch.float32)}})
    mgr.save(2, {"t": {"big": torch.arange(10, dtype=torch.float32)}})
    small = {"t": {"big": torch.full((1000,), 7.0)}}
    mgr.save(3, small)  # takes step 1's 800 KB file
    data = tmp_path / step_dirname(3) / rank_filename(0)
    assert data.stat().st_size == 4000
    verify(mgr.latest().uri)
    out = {"t": {"big": torch.zeros(1000)}}
    mgr.load(out)
    assert torch.equal(out["t"]["big"], small["t"]["big"])


def test_storage_in_place_overwrite_truncates(tmp_path) -> None:
    store = Storage(str(tmp_path))
    (tmp_path / "f").write_bytes(b"x" * 10_000)
    with store.open_write("f", in_place=True) as out:
        out.write(b"abc")
    assert (tmp_path / "f").read_bytes() == b"abc"


def test_a_failed_overwrite_keeps_the_previous_checkpoint(tmp_path, monkeypatch) -> None:
    root = str(tmp_path)
    mgr = CheckpointManager(root, keep_last=1)
    model, opt = cm.build(seed=1)
    for step in (1, 2):
        cm.train(model, opt, range(step, step + 1))
        mgr.save(step, state_of(model, opt, step))
    expected = cm.full_state(model, opt)
    original = storage_fs._LocalWriter.write
    calls = {"n": 0}

    def torn(self, data) -> int:  # the first chunk lands on the recycled file, then ENOSPC
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        return original(self, data)

    monkeypatch.setattr(storage_fs._LocalWriter, "write", torn)
    cm.train(model, opt, range(3, 4))
    with pytest.raises(StorageError, match="No space left"):
        mgr.save(3, state_of(model, opt, 3))
    monkeypatch.undo()
    assert calls["n"] == 2
    assert mgr.latest().step == 2
    assert not (tmp_path / step_dirname(3) / "COMMITTED").exists()
    cm.assert_same(expected, load_full(root))


def test_recycling_off_writes_new_files_and_empties_the_pool(tmp_path) -> None:
    root = str(tmp_path)
    on = CheckpointManager(root, keep_last=1)
    for step in (1, 2):
        on.save(step, {"t": {"w": torch.full((100,), float(step))}})
    assert len(pooled(tmp_path)) == 1
    off = CheckpointManager(root, keep_last=1, recycle_files=False)
    pooled_inode = inode(tmp_path / POOL_DIR / pooled(tmp_path)[0])
    off.save(3, {"t": {"w": torch.full((100,), 3.0)}})
    assert pooled(tmp_path) == []
    assert inode(tmp_path / step_dirname(3) / rank_filename(0)) != pooled_inode


def two_ranks_recycle(rank: int, world_size: int, root: str) -> dict[str, Any]:
    mgr = CheckpointManager(root, keep_last=1, persist_timeout_s=60)
    model, opt = cm.build(seed=5)
    inodes, expected = {}, None
    for step in range(1, 7):
        cm.train(model, opt, range(step, step + 1))
        expected = cm.full_state(model, opt)
        state = state_of(model, opt, step)
        if step % 2:
            mgr.save(step, state)
        else:
            mgr.async_save(step, state).result(timeout=60)
        inodes[step] = inode(Path(root) / step_dirname(step) / rank_filename(rank))
    return {"inodes": inodes, "expected": expected}


@pytest.mark.dist
def test_two_ranks_recycle_their_own_files_and_reshard(tmp_path) -> None:
    root = str(tmp_path)
    results = run_ranks(2, two_ranks_recycle, root, timeout_s=240)
    for rank, out in enumerate(results):
        seen = out["inodes"]
        assert seen[3] == seen[1] and seen[5] == seen[3], (rank, seen)
        assert seen[4] == seen[2] and seen[6] == seen[4], (rank, seen)
    assert [i.step for i in CheckpointManager(root).list()] == [6]
    cm.assert_same(results[0]["expected"], load_full(root))  # 2 -> 1
    verify(CheckpointManager(root).latest().uri)
