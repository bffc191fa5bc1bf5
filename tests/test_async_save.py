"""``CheckpointManager.async_save``: staged snapshot, background persist + commit, one save in
flight, typed background failures, rank death before the data is durable, staging reuse."""

from __future__ import annotations

import errno
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import ckpt_models as cm
from elastic_ckpt import AppState, CheckpointManager, verify
from elastic_ckpt.checkpoint.manifest import step_dirname
from elastic_ckpt.errors import CheckpointSaveError
from elastic_ckpt.storage import fs as storage_fs
from elastic_ckpt.train.local import run_ranks, spawn_ranks


# -- helpers ----------------------------------------------------------------------------------
def trained(step: int) -> tuple[Any, Any]:
    model, opt = cm.build(seed=step)
    cm.train(model, opt, range(step, step + 1))
    return model, opt


def state_of(model, opt, step: int) -> dict[str, Any]:
    return {"app": AppState(model, opt), "extra": {"step": step}}


def bump(model) -> None:
    """Change every parameter in place, as the next optimizer step would."""
    with torch.no_grad():
        for p in model.parameters():
            p.add_(1.0)


def load_full(root: str, step: int | None = None) -> tuple[dict[str, Any], Any]:
    model, opt = cm.build(seed=999)
    cm.train(model, opt, range(70, 71))  # the target has (different) optimizer state
    info = CheckpointManager(root).load({"app": AppState(model, opt)}, step=step)
    return cm.full_state(model, opt), info


def enospc(*args: Any, **kwargs: Any) -> int:
    raise OSError(errno.ENOSPC, "No space left on device")


def slow_close(seconds: float):
    original = storage_fs._LocalWriter.close

    def close(self, durable: bool) -> None:
        time.sleep(seconds)
        original(self, durable)

    return close


# -- single process ---------------------------------------------------------------------------
def test_round_trip_and_snapshot(tmp_path) -> None:
    root = str(tmp_path)
    mgr = CheckpointManager(root)
    model, opt = trained(1)
    expected = cm.full_state(model, opt)
    handle = mgr.async_save(1, state_of(model, opt, 1))
    bump(model)  # right after async_save returned: the staged copy is the snapshot
    info = handle.result(timeout=60)
    assert handle.done() and info.step == 1 and info.extra == {"extra": {"step": 1}}
    assert handle.staged_s > 0 and handle.persist_s > 0 and handle.waited_s >= 0
    assert handle.staged_bytes == info.total_bytes == mgr.staging_bytes
    state, loaded = load_full(root)
    assert loaded.step == 1
    cm.assert_same(expected, state)
    verify(info.uri)
    assert sorted(os.listdir(tmp_path / step_dirname(1))) == [
        "COMMITTED", "manifest.json", "rank-00000.bin"]


def test_back_to_back_saves_serialize(tmp_path, monkeypatch) -> None:
    root = str(tmp_path)
    mgr = CheckpointManager(root, keep_last=None)
    monkeypatch.setattr(storage_fs._LocalWriter, "close", slow_close(0.4))
    model, opt = trained(1)
    first_state = cm.full_state(model, opt)
    first = mgr.async_save(1, state_of(model, opt, 1))
    bump(model)
    second = mgr.async_save(2, state_of(model, opt, 2))
    assert first.done(), "the second save must wait for the first"
    assert second.waited_s >= 0.2, second.waited_s
    second_state = cm.full_state(model, opt)
    mgr.save(3, state_of(model, opt, 3))  # a sync save also waits for the one in flight
    assert second.done() and mgr.last_waited_s > 0
    assert [i.step for i in mgr.list()] == [1, 2, 3]
    cm.assert_same(first_state, load_full(root, 1)[0])
    cm.assert_same(second_state, load_full(root, 2)[0])


def test_background_enospc_is_typed_and_later_saves_succeed(tmp_path, monkeypatch) -> None:
    root = str(tmp_path)
    mgr = CheckpointManager(root, keep_last=None)
    model, opt = trained(1)
    first_state = cm.full_state(model, opt)
    mgr.save(1, state_of(model, opt, 1))
    monkeypatch.setattr(storage_fs._LocalWriter, "write", enospc)
    handle = mgr.async_save(2, state_of(model, opt, 2))  # staging succeeds; the write fails
    with pytest.raises(CheckpointSaveError) as err:
        handle.result(timeout=60)
    message = str(err.value)
    assert "ENOSPC" in message and "rank-00000.bin" in message, message
    assert err.value.details["errno"] == "ENOSPC" and err.value.details["file"] == \
        "rank-00000.bin"
    assert mgr.latest().step == 1
    assert not (tmp_path / step_dirname(2) / "COMMITTED").exists()
    cm.assert_same(first_state, load_full(root)[0])

    monkeypatch.undo()  # space freed
    bump(model)
    third_state = cm.full_state(model, opt)
    assert mgr.async_save(3, state_of(model, opt, 3)).result(timeout=60).step == 3
    assert [i.step for i in mgr.list()] == [1, 3]
    assert not (tmp_path / step_dirname(2)).exists(), "retention removes the debris"
    cm.assert_same(third_state, load_full(root)[0])


def test_staging_buffers_are_reused(tmp_path) -> None:
    mgr = CheckpointManager(str(tmp_path), keep_last=1)
    model, opt = trained(1)
    state = state_of(model, opt, 1)
    mgr.async_save(1, state).result(timeout=60)
    nbytes, count = mgr.staging_bytes, mgr.staging_buffers
    buffers = {k: b.data_ptr() for k, b in mgr._stager.buffers.items()}
    assert nbytes > 0 and count > 0
    for step in range(2, 101):  # 100 saves: the same buffers, no growth
        bump(model)
        mgr.async_save(step, state)
        assert (mgr.staging_bytes, mgr.staging_buffers) == (nbytes, count)
        assert {k: b.data_ptr() for k, b in mgr._stager.buffers.items()} == buffers
    expected = cm.full_state(model, opt)
    assert mgr.wait().result().step == 100
    cm.assert_same(expected, load_full(str(tmp_path))[0])
    assert [i.step for i in mgr.list()] == [100]
    # nor on disk: the newest checkpoint and one recycled file
    assert sorted(os.listdir(tmp_path)) == [".recycle", step_dirname(100)]
    assert len(os.listdir(tmp_path / ".recycle")) == 1


def die_before_durable(root: str) -> None:
    """Child: a committed step 1, then async_save step 2 and die in the background thread
    before the rank file is fsynced."""
    torch.set_num_threads(1)
    mgr = CheckpointManager(root, keep_last=None)
    model, opt = trained(1)
    torch.save(cm.full_state(model, opt), os.path.join(root, "expected.pt"))
    mgr.save(1, state_of(model, opt, 1))

    def sync(self) -> None:
        os._exit(1)

    storage_fs._LocalWriter.sync = sync
    bump(model)
    mgr.async_save(2, state_of(model, opt, 2))
    time.sleep(60)  # the background thread exits the process
    os._exit(0)


def test_killed_in_background_leaves_previous(tmp_path) -> None:
    root = str(tmp_path)
    proc = mp.get_context("spawn").Process(target=die_before_durable, args=(root,))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
        proc.join()
    assert proc.exitcode == 1
    assert not (tmp_path / step_dirname(2) / "COMMITTED").exists()
    mgr = CheckpointManager(root)
    assert mgr.latest().step == 1
    cm.assert_same(torch.load(tmp_path / "expected.pt"), load_full(root)[0])


# -- two ranks --------------------------------------------------------------------------------
def two_rank_cases(rank: int, world_size: int, root: str) -> dict[str, Any]:
    mgr = CheckpointManager(root, keep_last=None, persist_timeout_s=60)
    model, opt = trained(1)
    out: dict[str, Any] = {}
    # snapshot
    out[1] = cm.full_state(model, opt)
    handle = mgr.async_save(1, state_of(model, opt, 1))
    bump(model)
    handle.result(timeout=60)
    # back to back
    original_close = storage_fs._LocalWriter.close
    storage_fs._LocalWriter.close = slow_close(0.4)
    out[2] = cm.full_state(model, opt)
    first = mgr.async_save(2, state_of(model, opt, 2))
    bump(model)
    out[3] = cm.full_state(model, opt)
    second = mgr.async_save(3, state_of(model, opt, 3))
    out["serialized"] = (first.done(), second.waited_s)
    second.result(timeout=60)
    storage_fs._LocalWriter.close = original_close
    # ENOSPC on rank 1 only: both handles raise, rank 1's names ENOSPC and its file
    original_write = storage_fs._LocalWriter.write
    if rank == 1:
        storage_fs._LocalWriter.write = enospc
    bump(model)
    failed = mgr.async_save(4, state_of(model, opt, 4))
    try:
        failed.result(timeout=60)
        out["enospc"] = None
    except CheckpointSaveError as exc:
        out["enospc"] = str(exc)
    storage_fs._LocalWriter.write = original_write
    gathered: list[Any] = [None] * world_size
    dist.all_gather_object(gathered, out["enospc"])
    out["enospc"] = gathered
    out["latest_after_failure"] = mgr.latest().step
    # a later save succeeds, and loads at the same world size
    bump(model)
    out[5] = cm.full_state(model, opt)
    mgr.async_save(5, state_of(model, opt, 5)).result(timeout=60)
    out["same_world"] = load_full(root)[0]
    return out if rank == 0 else {}


@pytest.mark.dist
def test_two_ranks(tmp_path) -> None:
    root = str(tmp_path)
    (out, _) = run_ranks(2, two_rank_cases, root, timeout_s=240)
    done, waited = out["serialized"]
    assert done and waited >= 0.2, out["serialized"]
    rank0, rank1 = out["enospc"]
    assert rank1 and "ENOSPC" in rank1 and "rank-00001.bin" in rank1, rank1
    assert rank0 and "rank 1" in rank0 and "ENOSPC" in rank0, rank0
    assert out["latest_after_failure"] == 3
    cm.assert_same(out[5], out["same_world"])
    mgr = CheckpointManager(root)
    assert [i.step for i in mgr.list()] == [1, 2, 3, 5]
    assert not (tmp_path / step_dirname(4)).exists(), "retention removes the debris"
    for step in (1, 2, 3, 5):  # re-shard 2 -> 1 through the normal load path
        state, info = load_full(root, step)
        assert info.world_size == 2
        cm.assert_same(out[step], state, f"step {step}")


def rank_1_dies_in_the_second_save(rank: int, root: str, persist_timeout_s: float):
    """Step 1 committed (its full state in ``expected.pt``); then an async save of step 2 in
    which rank 1 exits before its data is durable. Returns ``(manager, handle)``."""
    mgr = CheckpointManager(root, keep_last=None, persist_timeout_s=persist_timeout_s)
    model, opt = trained(1)
    expected = cm.full_state(model, opt)
    mgr.save(1, state_of(model, opt, 1))
    if rank == 0:
        torch.save(expected, os.path.join(root, "expected.pt"))
    if rank == 1:
        def sync(self) -> None:
            os._exit(1)

        storage_fs._LocalWriter.sync = sync
    bump(model)
    return mgr, mgr.async_save(2, state_of(model, opt, 2))


def rank_dies_in_background(rank: int, world_size: int, root: str) -> str | None:
    _, handle = rank_1_dies_in_the_second_save(rank, root, persist_timeout_s=3)
    try:
        handle.result(timeout=60)
    except CheckpointSaveError as exc:
        return str(exc)
    return None


@pytest.mark.dist
def test_two_ranks_one_dies_before_its_data_is_durable(tmp_path) -> None:
    root = str(tmp_path)
    outcomes = spawn_ranks(2, rank_dies_in_background, root, timeout_s=120, grace_s=20)
    assert (outcomes[1].status, outcomes[1].value) == ("died", 1), outcomes[1]
    assert outcomes[0].status == "ok" and "timed out" in outcomes[0].value, outcomes[0]
    debris = Path(root) / step_dirname(2)
    assert not (debris / "COMMITTED").exists() and not (debris / "manifest.json").exists()
    mgr = CheckpointManager(root)
    assert mgr.latest().step == 1 and mgr.latest().world_size == 2
    cm.assert_same(torch.load(Path(root) / "expected.pt"), load_full(root)[0])


def rank_dies_then_survivor_abandons(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Rank 1 dies before its data is durable; rank 0 (the committer) closes its manager with
    ``abandon=True`` instead of waiting out the 60 s persist timeout."""
    mgr, handle = rank_1_dies_in_the_second_save(rank, root, persist_timeout_s=60)
    time.sleep(1.0)  # rank 1 is gone; rank 0 waits for its marker
    t0 = time.monotonic()
    mgr.close(abandon=True)
    closed_s = time.monotonic() - t0
    try:
        handle.result(timeout=0)
        error = None
    except CheckpointSaveError as exc:
        error = str(exc)
    return {"closed_s": closed_s, "error": error, "latest": mgr.latest().step,
            "threads": [t.name for t in threading.enumerate() if "persist" in t.name]}


@pytest.mark.dist
def test_close_abandons_a_save_whose_peer_died(tmp_path) -> None:
    root = str(tmp_path)
    outcomes = spawn_ranks(2, rank_dies_then_survivor_abandons, root, timeout_s=120,
                           grace_s=20)
    assert (outcomes[1].status, outcomes[1].value) == ("died", 1), outcomes[1]
    out = outcomes[0].value
    assert outcomes[0].status == "ok", outcomes[0]
    assert out["closed_s"] < 10, out
    assert out["error"] and "abandoned" in out["error"], out
    assert out["latest"] == 1 and out["threads"] == [], out
    assert not (Path(root) / step_dirname(2) / "COMMITTED").exists()

def all_ranks_die_in_background(rank: int, world_size: int, root: str) -> None:
    """keep_last=1: step 1's files are recycled, so step 3's persist overwrites them in place
    when every rank dies (after its data is written, before the fsync and the markers)."""
    mgr = CheckpointManager(root, keep_last=1, persist_timeout_s=60)
    model, opt = trained(1)
    mgr.save(1, state_of(model, opt, 1))
    bump(model)
    expected = cm.full_state(model, opt)
    mgr.save(2, state_of(model, opt, 2))
    if rank == 0:
        torch.save(expected, os.path.join(root, "expected.pt"))

    def sync(self) -> None:
        os._exit(3)

    storage_fs._LocalWriter.sync = sync
    bump(model)
    mgr.async_save(3, state_of(model, opt, 3))  # returned: staged; the persist kills us
    time.sleep(60)


@pytest.mark.dist
def test_all_ranks_die_after_async_save_returned(tmp_path) -> None:
    root = str(tmp_path)
    outcomes = spawn_ranks(2, all_ranks_die_in_background, root, timeout_s=120, grace_s=20)
    assert [(o.status, o.value) for o in outcomes] == [("died", 3), ("died", 3)], outcomes
    debris = Path(root) / step_dirname(3)
    assert sorted(os.listdir(debris)) == ["rank-00000.bin", "rank-00001.bin"], \
        "both ranks were overwriting recycled files"
    mgr = CheckpointManager(root)
    assert mgr.latest().step == 2 and [i.step for i in mgr.list()] == [2]
    cm.assert_same(torch.load(Path(root) / "expected.pt"), load_full(root)[0])
    verify(mgr.latest().uri)
    # the next run saves over the debris and retention clears it
    model, opt = trained(4)
    CheckpointManager(root, keep_last=1).save(4, state_of(model, opt, 4))
    assert [i.step for i in CheckpointManager(root).list()] == [4]
    assert not debris.exists()


# -- the plan cache -----------------------------------------------------------------------------
def test_plans_are_reused_until_the_state_changes_shape(tmp_path) -> None:
    root = str(tmp_path)
    mgr = CheckpointManager(root, keep_last=None)
    model, opt = trained(3)
    mgr.async_save(1, state_of(model, opt, 1)).result(timeout=60)
    first = mgr._plans
    assert first is not None
    cm.train(model, opt, range(3, 4))
    expected = cm.full_state(model, opt)
    mgr.async_save(2, state_of(model, opt, 2)).result(timeout=60)
    assert mgr._plans is first, "an unchanged state reuses the plans"
    cm.assert_same(expected, load_full(root, 2)[0])
    extra = {"w": torch.arange(6.0)}  # a new tensor entry: new plans
    mgr.async_save(3, {**state_of(model, opt, 3), "more": extra}).result(timeout=60)
    assert mgr._plans is not first
    loaded = {"w": torch.zeros(6)}
    CheckpointManager(root).load({"more": loaded}, step=3)
    assert torch.equal(loaded["w"], extra["w"])
    bump(model)
    expected = cm.full_state(model, opt)
    info = mgr.async_save(4, {"app": AppState(model, opt), "extra": {"step": 4}}).result(60)
    assert info.extra == {"extra": {"step": 4}}
    cm.assert_same(expected, load_full(root, 4)[0])



def test_state_signature_sees_what_the_plan_depends_on(tmp_path) -> None:
    from elastic_ckpt.checkpoint.plan_cache import state_signature
    from elastic_ckpt.errors import NotCheckpointableError

    def sig(flat: dict[str, Any]) -> tuple:
        return state_signature(flat, {k: (k,) for k in flat}, rank=0, world_size=1)

    base = {"w": torch.zeros(4, 3), "step": 7}
    assert sig(base) == sig({"w": torch.ones(4, 3), "step": 8}), "values do not matter"
    for changed in ({"w": torch.zeros(3, 4), "step": 7}, {"w": torch.zeros(4, 3).double(),
                    "step": 7}, {"w": torch.zeros(4, 3), "step": torch.tensor(7)},
                    {**base, "more": 1}, {"w": torch.zeros(4, 3, requires_grad=True),
                                          "step": 7}):
        assert sig(changed) != sig(base), changed
    mgr = CheckpointManager(str(tmp_path), keep_last=None)
    model, opt = trained(1)
    mixed = {"w": torch.zeros(2), "tag": "a"}  # a DCP entry with a non-tensor leaf
    mgr.async_save(1, {**state_of(model, opt, 1), "mixed": mixed}).result(timeout=60)
    assert mgr._plans is not None
    with pytest.raises(NotCheckpointableError, match="mixed.tag"):  # same signature, not JSON
        mgr.async_save(2, {**state_of(model, opt, 2), "mixed": {**mixed, "tag": {1, 2}}})
    assert mgr.latest().step == 1

def staging_fails_on_one_rank(rank: int, world_size: int, root: str) -> dict[str, Any]:
    from elastic_ckpt.checkpoint.staging import HostStager

    mgr = CheckpointManager(root, keep_last=None, persist_timeout_s=30)
    model, opt = trained(1)
    mgr.async_save(1, state_of(model, opt, 1)).result(timeout=60)  # plans cached
    if rank == 1:
        def stage(self, *args: Any, **kwargs: Any):
            raise RuntimeError("host out of memory (injected)")

        HostStager.stage = stage
    try:
        mgr.async_save(2, state_of(model, opt, 2))
        outcome = None
    except Exception as exc:  # noqa: BLE001 - reported to the test
        outcome = f"{type(exc).__name__}: {exc}"
    return {"outcome": outcome, "latest": mgr.latest().step}


@pytest.mark.dist
def test_a_staging_failure_on_one_rank_raises_on_every_rank(tmp_path) -> None:
    results = run_ranks(2, staging_fails_on_one_rank, str(tmp_path), timeout_s=120)
    assert "host out of memory" in results[1]["outcome"], results
    assert "host out of memory" in results[0]["outcome"], results
    assert [r["latest"] for r in results] == [1, 1]
    assert not (tmp_path / step_dirname(2) / "COMMITTED").exists()


def overlapped_staging(rank: int, world_size: int, root: str) -> dict[str, Any]:
    import threading

    from elastic_ckpt.checkpoint import staging

    mgr = CheckpointManager(root, keep_last=None, persist_timeout_s=60)
    model, opt = trained(1)
    expected = cm.full_state(model, opt)
    original, threads = staging._copy, []

    def slow_copy(buf: torch.Tensor, src: torch.Tensor) -> None:
        # Slow enough that a missing fence lets the optimizer step below into the checkpoint.
        threads.append((threading.current_thread().name, src.dtype))
        time.sleep(0.05)
        original(buf, src)

    staging._copy = slow_copy
    try:
        handle = mgr.async_save(1, state_of(model, opt, 1), overlap_staging=True)
        with torch.no_grad():
            model.seen.add_(7)  # a plain buffer: copied before async_save returned
        blocked = handle.wait_staged(timeout=60)
        cm.train(model, opt, range(1, 2))  # the optimizer step changes params and exp_avg
        handle.result(timeout=60)
    finally:
        staging._copy = original
    out = {"main": [d for name, d in threads if name == "MainThread"],
           "deferred": [name for name, _ in threads if name != "MainThread"],
           "deferred_dtypes": [d for name, d in threads if name != "MainThread"], "blocked": blocked, "copy_s": handle.fence.copy_s,
           "stall_s": handle.stall_s, "staged_s": handle.staged_s}
    loaded = load_full(root, step=1)[0]
    if rank == 0:
        out["expected"], out["loaded"] = expected, loaded
    return out


@pytest.mark.dist
def test_overlapped_staging_defers_dtensor_copies_behind_the_fence(tmp_path) -> None:
    """``overlap_staging``: DTensor copies run on the persist thread after ``async_save``
    returned; ``wait_staged`` holds the caller until they are made, so an optimizer step after
    it never reaches the checkpoint, and a plain buffer changed before it does not either."""
    results = run_ranks(2, overlapped_staging, str(tmp_path), timeout_s=120)
    for out in results:
        # plain tensors (the ``seen`` buffer, AdamW's step counters) are copied at once
        # 7 sharded parameters and their 2 AdamW moments each, on the persist thread
        assert len(out["deferred"]) == 21, out
        assert set(out["deferred"]) == {"elastic-ckpt-persist_0"}, out
        assert out["blocked"] > 0.02 and out["copy_s"] >= 0.05 * 21 * 0.9, out
        assert out["stall_s"] == pytest.approx(out["staged_s"] + out["blocked"]), out
        assert torch.int64 not in out["deferred_dtypes"], out
    # the ``seen`` buffer (deduplicated to one rank) is copied before async_save returns
    assert any(torch.int64 in out["main"] for out in results)
    cm.assert_same(results[0]["expected"], results[0]["loaded"])


def cached_plan_edge_cases(rank: int, world_size: int, root: str) -> dict[str, Any]:
    mgr = CheckpointManager(root, keep_last=None, persist_timeout_s=60)
    model, opt = trained(1)
    mgr.async_save(1, state_of(model, opt, 1)).result(timeout=60)
    first = mgr._plans
    state = state_of(model, opt, 2)
    if rank == 1:  # only this rank's plan changes: every rank must plan with DCP again
        state["more"] = {"w": torch.arange(5.0)}
    info = mgr.async_save(2, state).result(timeout=60)
    out: dict[str, Any] = {"replanned": mgr._plans is not first, "uri": info.uri}
    try:  # cached path; rank 0 finds step 2 committed: raised on every rank, nothing hangs
        mgr.async_save(2, state)
        out["error"] = None
    except CheckpointSaveError as exc:
        out["error"] = str(exc)
    out["step3"] = mgr.async_save(3, state).result(timeout=60).step
    out["latest"] = mgr.latest().step
    return out


@pytest.mark.dist
def test_cached_plans_when_one_rank_changes_or_rank_0_fails(tmp_path) -> None:
    results = run_ranks(2, cached_plan_edge_cases, str(tmp_path), timeout_s=120)
    for out in results:
        assert out["replanned"], out
        assert out["error"] and "already committed" in out["error"], out
        assert out["step3"] == 3 and out["latest"] == 3, out
    verify(results[0]["uri"])
    with open(os.path.join(results[0]["uri"], "manifest.json")) as f:
        assert "more" in f.read(), "rank 1's new entry is in the replanned checkpoint"
