"""Retention: the pure policy as a table, then CheckpointManager applying it end to end in one
process with no torch.distributed process group."""

from __future__ import annotations

import pytest
import torch

from elastic_ckpt import CheckpointManager, ConfigError
from elastic_ckpt.checkpoint.manifest import step_dirname
from elastic_ckpt.checkpoint.recycle import POOL_DIR
from elastic_ckpt.checkpoint.retention import steps_to_delete, validate_retention

R = range  # keeps the table narrow

# committed, uncommitted, keep_last, keep_every, in_progress -> deleted
TABLE = [
    ([], [], 3, None, (), []),
    ([], [1, 2], 3, None, (), []),                        # nothing committed: no debris yet
    ([1, 2, 3, 4, 5], [], 3, None, (), [1, 2]),
    ([5, 1, 3, 2, 4], [], 3, None, (), [1, 2]),           # order of input does not matter
    ([1, 2, 3], [], 1, None, (), [1, 2]),
    ([1, 2, 3], [], 5, None, (), []),
    ([1, 2, 3], [], None, None, (), []),                  # keep_last=None keeps all
    ([7], [], 1, 5, (), []),                              # newest kept though not a multiple
    (list(R(1, 11)), [], 2, 5, (), [1, 2, 3, 4, 6, 7, 8]),
    (list(R(1, 11)), [], 1, 4, (), [1, 2, 3, 5, 6, 7, 9]),
    (list(R(1, 11)), [], None, 4, (), []),
    ([3, 6], [2, 4, 7], 1, None, (), [2, 3, 4]),          # debris older than newest goes ...
    ([3, 6], [2, 4, 7], None, None, (), [2, 4]),          # ... even when keeping all
    ([3, 6], [7, 9], 2, None, (), []),                    # newer debris may be a running save
    ([3, 6], [2, 4, 7], 1, None, (2, 3), [4]),            # in_progress is never deleted
    ([3, 6], [2, 4, 7], 1, None, (6, 7), [2, 3, 4]),
]


@pytest.mark.parametrize(("committed", "uncommitted", "keep_last", "keep_every", "in_progress",
                          "deleted"), TABLE)
def test_steps_to_delete(committed, uncommitted, keep_last, keep_every, in_progress,
                         deleted) -> None:
    out = steps_to_delete(committed, uncommitted, keep_last, keep_every, frozenset(in_progress))
    assert out == deleted
    newest = max(committed, default=None)
    assert newest not in out


@pytest.mark.parametrize(("keep_last", "keep_every", "field"), [
    (0, None, "keep_last"), (-1, None, "keep_last"), (3, 0, "keep_every"), (None, -2, "keep_every"),
])
def test_invalid_retention_is_a_config_error(tmp_path, keep_last, keep_every, field) -> None:
    with pytest.raises(ConfigError, match=field) as err:
        validate_retention(keep_last, keep_every)
    assert err.value.field == field
    with pytest.raises(ConfigError, match=field):
        CheckpointManager(str(tmp_path), keep_last=keep_last, keep_every=keep_every)


@pytest.mark.parametrize(("keep_last", "keep_every", "steps", "kept"), [
    (2, None, [1, 2, 3, 4, 5], [4, 5]),
    (1, None, [10, 20, 30], [30]),
    (2, 3, [1, 2, 3, 4, 5, 6, 7], [3, 6, 7]),
    (None, None, [1, 2, 3], [1, 2, 3]),
])
def test_manager_keeps_exactly_the_configured_checkpoints(tmp_path, keep_last, keep_every, steps,
                                                          kept) -> None:
    assert not torch.distributed.is_initialized()
    mgr = CheckpointManager(str(tmp_path), keep_last=keep_last, keep_every=keep_every)
    for step in steps:
        info = mgr.save(step, {"w": torch.full((3,), float(step)), "meta": {"step": step}})
        assert info.step == step and info.world_size == 1
    assert [i.step for i in mgr.list()] == kept
    assert mgr.latest().step == kept[-1]
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != POOL_DIR) == [
        step_dirname(s) for s in kept]
    pool = tmp_path / POOL_DIR  # the removed checkpoints' files, one checkpoint's worth
    assert len(list(pool.iterdir())) == 1 if len(kept) < len(steps) else not pool.exists()
    for step in kept:  # what is kept still loads, and holds its own step's values
        w, meta = torch.zeros(3), {}
        assert mgr.load({"w": w, "meta": meta}, step=step).step == step
        assert torch.equal(w, torch.full((3,), float(step))) and meta == {"step": step}


def test_manager_retention_around_debris_and_foreign_entries(tmp_path) -> None:
    mgr = CheckpointManager(str(tmp_path), keep_last=1)
    mgr.save(5, {"w": torch.ones(2)})
    for name in (step_dirname(4), step_dirname(9), "notes", "step-12"):
        (tmp_path / name).mkdir()
    (tmp_path / step_dirname(4) / "rank-00000.bin").write_bytes(b"partial")
    (tmp_path / step_dirname(3)).write_bytes(b"a file, not a checkpoint")
    mgr.save(6, {"w": torch.ones(2)})
    # step 5 (old), step 4 (debris older than 6) removed; step 9 may be a save still running;
    # entries that are not step directories are not ours to touch.
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != POOL_DIR) == sorted([
        step_dirname(3), step_dirname(6), step_dirname(9), "notes", "step-12"])
    assert [i.step for i in mgr.list()] == [6]


def test_retention_cut_short_leaves_debris_not_a_broken_committed_checkpoint(
        tmp_path, monkeypatch) -> None:
    from elastic_ckpt.storage import Storage

    mgr = CheckpointManager(str(tmp_path), keep_last=1)
    mgr.save(1, {"w": torch.ones(2)})
    real = Storage.remove_tree

    def dies(self, name):  # the process dies after the first file of the delete
        (tmp_path / name / "rank-00000.bin").unlink(missing_ok=True)  # (or it was recycled)
        raise OSError("killed mid-delete")

    monkeypatch.setattr(Storage, "remove_tree", dies)
    with pytest.raises(OSError):
        mgr.save(2, {"w": torch.zeros(2)})
    assert (tmp_path / step_dirname(1) / "manifest.json").exists()  # half deleted
    assert [i.step for i in mgr.list()] == [2]  # and not offered as a checkpoint
    monkeypatch.setattr(Storage, "remove_tree", real)
    mgr.save(3, {"w": torch.zeros(2)})  # the next retention removes the debris
    assert sorted(p.name for p in tmp_path.iterdir() if p.name != POOL_DIR) == [
        step_dirname(3)]


def test_saving_a_committed_step_again_is_refused(tmp_path) -> None:
    from elastic_ckpt.errors import CheckpointSaveError

    mgr = CheckpointManager(str(tmp_path))
    mgr.save(1, {"w": torch.ones(2)})
    with pytest.raises(CheckpointSaveError, match="already committed"):
        mgr.save(1, {"w": torch.zeros(2)})
    w = torch.zeros(2)
    mgr.load({"w": w})
    assert torch.equal(w, torch.ones(2))
    with pytest.raises(CheckpointSaveError, match="non-negative int"):
        mgr.save(-1, {"w": w})
