"""Fault injection: saves killed part-way, corrupted / truncated / missing data files, forged
or malformed manifests, and loads that do not fit. Every failure must be typed, name the file
and tensor, reach every rank, and never hang or load debris."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.multiprocessing as mp

import ckpt_models as cm
from elastic_ckpt.train.local import run_ranks, spawn_ranks
from elastic_ckpt import (
    AppState,
    CheckpointCorruptError,
    CheckpointError,
    CheckpointManager,
    CheckpointMismatchError,
    CheckpointNotCommittedError,
    CheckpointNotFoundError,
    verify,
)
from elastic_ckpt.checkpoint.manifest import Manifest, step_dirname
from elastic_ckpt.errors import CheckpointSaveError

pytestmark = pytest.mark.fault

BLOCK = 64
"""Small checksum blocks, so a re-sharded load reads (and verifies) only part of a chunk."""
STEP = cm.SAVE_STEP


# -- helpers ----------------------------------------------------------------------------------
def save_state(root: str, step: int, **manager_kw: Any) -> dict[str, Any]:
    """Save a model whose state depends on ``step``; return that state (single process)."""
    return cm.save_state_at(CheckpointManager(root, keep_last=None, **manager_kw), step)


def load_state(root: str, step: int | None = None) -> tuple[dict[str, Any], Any]:
    model, opt = cm.build(seed=999)
    info = CheckpointManager(root).load({"app": AppState(model, opt)}, step=step)
    return cm.full_state(model, opt), info


def crash_during_save(root: str, step: int, phase: str) -> None:
    """Child process: save ``step`` and die (``os._exit``) at ``phase`` of the commit."""
    torch.set_num_threads(1)

    def die(p: str) -> None:
        if p == phase:
            os._exit(1)

    save_state(root, step, on_phase=die)
    os._exit(0)  # the phase never came


def run_crashing_child(root: str, step: int, phase: str) -> None:
    proc = mp.get_context("spawn").Process(target=crash_during_save, args=(root, step, phase))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
        proc.join()
    assert proc.exitcode == 1, f"child should die at {phase!r}, exit code {proc.exitcode}"


def chunk_of(manifest: Manifest, fqn: str):
    (chunk,) = manifest.tensors[fqn].chunks
    return chunk


def corrupt(step_dir: Path, kind: str) -> tuple[str, set[str]]:
    """Damage the checkpoint; return ``(data file, tensors a full load must name)``."""
    manifest = Manifest.from_json((step_dir / "manifest.json").read_bytes(), "manifest")
    fqn = "app.model.emb.weight"
    chunk = chunk_of(manifest, fqn)
    path = step_dir / chunk.file
    if kind == "flip":
        # A byte of the last embedding row: at 3 ranks only rank 2 owns (and reads) that row.
        offset = chunk.byte_offset + chunk.byte_length - 3
        data = bytearray(path.read_bytes())
        data[offset] ^= 0x10
        path.write_bytes(bytes(data))
        return chunk.file, {fqn}
    if kind == "truncate":
        cut = chunk.byte_offset + chunk.byte_length // 2
        os.truncate(path, cut)
        return chunk.file, {name for name, t in manifest.tensors.items() for c in t.chunks
                            if c.file == chunk.file and c.byte_offset + c.byte_length > cut}
    if kind == "missing":
        path.unlink()
        return chunk.file, {name for name, t in manifest.tensors.items()
                            if any(c.file == chunk.file for c in t.chunks)}
    raise AssertionError(kind)


def assert_names(exc: BaseException, file: str, tensors: set[str]) -> None:
    message = str(exc)
    assert isinstance(exc, CheckpointCorruptError), repr(exc)
    assert file in message, message
    assert exc.file == file
    assert exc.tensor in tensors and repr(exc.tensor) in message, message


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> tuple[Path, dict[str, Any]]:
    """A committed single-process checkpoint with small checksum blocks, and its state."""
    root = tmp_path_factory.mktemp("reference")
    return root, cm.save_reference(str(root), block_size_bytes=BLOCK)


@pytest.fixture
def root(reference, tmp_path) -> Path:
    """A private copy of the reference checkpoint root, free to damage."""
    return Path(shutil.copytree(reference[0], tmp_path / "root"))


# -- crash safety -----------------------------------------------------------------------------
@pytest.mark.parametrize("phase", ["data_written", "manifest_written"])
def test_killed_save_leaves_previous_checkpoint(tmp_path, phase: str) -> None:
    root = str(tmp_path)
    first = save_state(root, 1)
    run_crashing_child(root, 2, phase)

    debris = tmp_path / step_dirname(2)
    assert (debris / "rank-00000.bin").is_file()
    assert (debris / "manifest.json").is_file() == (phase == "manifest_written")
    assert not (debris / "COMMITTED").exists()
    mgr = CheckpointManager(root, keep_last=None)
    assert [i.step for i in mgr.list()] == [1]
    assert mgr.latest().step == 1
    with pytest.raises(CheckpointNotCommittedError, match="step-00000002"):
        load_state(root, step=2)
    with pytest.raises(CheckpointNotCommittedError):
        verify(str(debris))
    state, info = load_state(root)
    assert info.step == 1 and info.extra == {"extra": {"step": 1}}
    cm.assert_same(first, state)

    # Once a newer checkpoint commits, retention removes the debris (even with keep_last=None).
    third = save_state(root, 3)
    assert not debris.exists()
    assert [i.step for i in mgr.list()] == [1, 3]
    cm.assert_same(third, load_state(root)[0])


def test_resave_of_a_crashed_step_succeeds(tmp_path) -> None:
    root = str(tmp_path)
    run_crashing_child(root, 2, "manifest_written")
    assert CheckpointManager(root).latest() is None
    with pytest.raises(CheckpointNotFoundError):  # debris is not a checkpoint
        load_state(root)
    second = save_state(root, 2)
    state, info = load_state(root)
    assert info.step == 2
    cm.assert_same(second, state)
    verify(info.uri)
    assert sorted(p.name for p in (tmp_path / step_dirname(2)).iterdir()) == [
        "COMMITTED", "manifest.json", "rank-00000.bin"]


def test_failed_save_keeps_previous_and_newer_debris(tmp_path) -> None:
    """A save failing in-process (here: at the manifest) raises a CheckpointError; a
    newer uncommitted directory may be a save still running, so retention keeps it."""
    root = str(tmp_path)

    def fail(phase: str) -> None:
        if phase == "data_written":
            raise RuntimeError("injected failure")

    first = save_state(root, 1)
    with pytest.raises(CheckpointError, match="injected failure"):
        save_state(root, 5, on_phase=fail)
    assert CheckpointManager(root).latest().step == 1
    save_state(root, 3)
    assert (tmp_path / step_dirname(5)).is_dir()
    assert [i.step for i in CheckpointManager(root).list()] == [1, 3]
    cm.assert_same(first, load_state(root, step=1)[0])


def save_then_crash(rank: int, world_size: int, root: str) -> None:
    expected = save_state(root, 1)
    if rank == 0:
        torch.save(expected, os.path.join(root, "expected.pt"))

    def die(phase: str) -> None:
        if phase == "data_written":
            os._exit(1)

    save_state(root, 2, on_phase=die)


@pytest.mark.dist
def test_two_rank_save_killed_between_data_and_manifest(tmp_path) -> None:
    root = str(tmp_path)
    outcomes = spawn_ranks(2, save_then_crash, root, timeout_s=120, grace_s=5)
    assert (outcomes[0].status, outcomes[0].value) == ("died", 1), outcomes[0]
    assert outcomes[1].status in ("error", "killed"), outcomes[1]  # its peer vanished

    debris = tmp_path / step_dirname(2)
    assert sorted(p.name for p in debris.iterdir()) == ["rank-00000.bin", "rank-00001.bin"]
    mgr = CheckpointManager(root)
    assert mgr.latest().step == 1 and mgr.latest().world_size == 2
    with pytest.raises(CheckpointNotCommittedError):
        load_state(root, step=2)
    cm.assert_same(torch.load(tmp_path / "expected.pt"), load_state(root)[0])


# -- corruption, single process ---------------------------------------------------------------
def test_intact_checkpoint_verifies(reference) -> None:
    report = verify(str(reference[0] / step_dirname(STEP)))
    assert report.step == STEP and report.bytes_checked == reference[1]["info"].total_bytes


@pytest.mark.parametrize("kind", ["flip", "truncate", "missing"])
def test_verify_names_file_and_tensor(root, kind: str) -> None:
    file, tensors = corrupt(root / step_dirname(STEP), kind)
    with pytest.raises(CheckpointCorruptError) as err:
        verify(str(root / step_dirname(STEP)))
    assert_names(err.value, file, tensors)


@pytest.mark.parametrize("kind", ["flip", "truncate", "missing"])
def test_single_process_load_names_file_and_tensor(root, kind: str) -> None:
    file, tensors = corrupt(root / step_dirname(STEP), kind)
    with pytest.raises(CheckpointCorruptError) as err:
        load_state(str(root))
    assert_names(err.value, file, tensors)


def edit_manifest(step_dir: Path, edit) -> None:
    path = step_dir / "manifest.json"
    doc = json.loads(path.read_text())
    edit(doc)
    path.write_text(json.dumps(doc))


@pytest.mark.parametrize("bad", ["../x", "a/b", "/etc/passwd", "..", ""])
def test_manifest_with_path_outside_checkpoint_is_refused(root, bad: str) -> None:
    step_dir = root / step_dirname(STEP)

    def point_outside(doc):
        doc["tensors"]["app.model.l1.bias"]["chunks"][0]["file"] = bad

    edit_manifest(step_dir, point_outside)
    for action in (lambda: verify(str(step_dir)), lambda: load_state(str(root))):
        with pytest.raises(CheckpointCorruptError, match="manifest.json") as err:
            action()
        assert "app.model.l1.bias" in str(err.value) and "file" in str(err.value)


@pytest.mark.parametrize("text", [b"{\"format\": \"elastic_ckpt\", ", b"", b"[]", b"\xff\xfe"])
def test_malformed_manifest_is_corrupt(root, text: bytes) -> None:
    step_dir = root / step_dirname(STEP)
    (step_dir / "manifest.json").write_bytes(text)
    for action in (lambda: verify(str(step_dir)), lambda: load_state(str(root))):
        with pytest.raises(CheckpointCorruptError, match="manifest.json"):
            action()


def test_missing_manifest_of_committed_checkpoint_is_corrupt(root) -> None:
    (root / step_dirname(STEP) / "manifest.json").unlink()
    with pytest.raises(CheckpointCorruptError, match="manifest.json"):
        load_state(str(root))


def test_manifest_overlapping_chunks_fail_verify(root) -> None:
    step_dir = root / step_dirname(STEP)

    def overlap(doc):
        a = doc["tensors"]["app.model.l1.bias"]["chunks"][0]
        b = doc["tensors"]["app.model.norm.bias"]["chunks"][0]
        b["byte_offset"] = a["byte_offset"]
        b["checksums"] = a["checksums"]  # same length, same bytes: the checksums pass

    edit_manifest(step_dir, overlap)
    with pytest.raises(CheckpointCorruptError, match="overlap"):
        verify(str(step_dir))


def test_missing_step_and_empty_root(root, tmp_path) -> None:
    with pytest.raises(CheckpointNotFoundError, match="step-00000099"):
        load_state(str(root), step=99)
    (tmp_path / "empty").mkdir()
    for empty in (tmp_path / "empty", tmp_path / "absent"):
        mgr = CheckpointManager(str(empty))
        assert mgr.latest() is None and mgr.list() == []
        with pytest.raises(CheckpointNotFoundError, match=str(empty)):
            load_state(str(empty))
    with pytest.raises(CheckpointNotFoundError):
        verify(str(tmp_path / "absent" / step_dirname(1)))


def test_shape_mismatch_names_tensor(root) -> None:
    model, opt = cm.build(seed=1, vocab=cm.VOCAB + 1)
    with pytest.raises(CheckpointMismatchError, match=r"app\.model\.emb\.weight.*\(38, 13\)") as e:
        CheckpointManager(str(root)).load({"app": AppState(model, opt)})
    assert e.value.tensor == "app.model.emb.weight"


def test_missing_tensor_in_checkpoint_is_mismatch(root) -> None:
    model, opt = cm.build(seed=1)
    state = {"app": AppState(model, opt), "more": {"t": torch.zeros(2)}}
    with pytest.raises(CheckpointMismatchError, match="more"):
        CheckpointManager(str(root)).load(state)


# -- corruption and errors, multi-rank ---------------------------------------------------------
KINDS = ["flip", "truncate", "missing"]


def load_damaged(rank: int, world_size: int, roots: dict[str, str]) -> dict[str, Any]:
    """Each load must raise on every rank; after all of them an intact load still works (the
    ranks stayed in step). Returns ``{case: (error type, message, details)}``."""
    out: dict[str, Any] = {}

    def attempt(case, fn):
        try:
            fn()
            out[case] = ("no error", "", {})
        except Exception as exc:  # noqa: BLE001 - reported to the parent
            out[case] = (type(exc).__name__, str(exc), dict(getattr(exc, "details", {})))

    for kind in KINDS:
        attempt(kind, lambda: cm.load_fresh(roots[kind]))

    def mismatch():
        model, opt = cm.build(seed=1, vocab=cm.VOCAB + 1)
        CheckpointManager(roots["intact"]).load({"app": AppState(model, opt)})

    attempt("mismatch", mismatch)
    attempt("missing step", lambda: cm.load_fresh(roots["intact"], step=99))
    attempt("resave committed", lambda: cm.save_reference(roots["intact"]))
    loaded = cm.load_fresh(roots["intact"])
    out["intact"] = loaded["state"] if rank == 0 else None
    return out


@pytest.fixture(scope="module")
def dist_damaged(reference, tmp_path_factory) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    base = tmp_path_factory.mktemp("damaged")
    roots, damage = {}, {}
    for kind in [*KINDS, "intact"]:
        roots[kind] = str(shutil.copytree(reference[0], base / kind))
        if kind != "intact":
            damage[kind] = corrupt(Path(roots[kind]) / step_dirname(STEP), kind)
    return run_ranks(3, load_damaged, roots, timeout_s=180), damage


@pytest.mark.dist
@pytest.mark.parametrize("kind", KINDS)
def test_multi_rank_load_raises_on_every_rank(dist_damaged, kind: str) -> None:
    results, damage = dist_damaged
    file, tensors = damage[kind]
    for rank, out in enumerate(results):
        name, message, details = out[kind]
        assert name == "CheckpointCorruptError", (rank, name, message)
        assert file in message and details["file"] == file, (rank, message)
        assert details["tensor"] in tensors and repr(details["tensor"]) in message, (rank, message)
    if kind == "flip":  # only rank 2 read the bad row; the others learn it from rank 2
        assert all(out[kind][1].startswith("rank 2: ") for out in results)


@pytest.mark.dist
def test_multi_rank_mismatch_and_missing_step(dist_damaged, reference) -> None:
    results, _ = dist_damaged
    for out in results:
        name, message, details = out["mismatch"]
        assert name == "CheckpointMismatchError" and details["tensor"] == "app.model.emb.weight"
        assert "app.model.emb.weight" in message
        assert out["missing step"][0] == "CheckpointNotFoundError"
    cm.assert_same(reference[1]["state"], results[0]["intact"])


@pytest.mark.dist
def test_multi_rank_resave_of_committed_step_raises_everywhere(dist_damaged) -> None:
    results, _ = dist_damaged
    for out in results:
        name, message, _ = out["resave committed"]
        assert name == CheckpointSaveError.__name__ and "already committed" in message


# -- falling back past a corrupt latest checkpoint ----------------------------------------------
@pytest.fixture
def two_steps(tmp_path) -> tuple[Path, dict[int, dict[str, Any]]]:
    """Checkpoints at steps 1 and 2 (different states) under one root."""
    root = tmp_path / "two"
    return root, {s: save_state(str(root), s, block_size_bytes=BLOCK) for s in (1, 2)}


def _flip_a_byte(step_dir: Path) -> None:
    data = next(p for p in sorted(step_dir.iterdir()) if p.suffix == ".bin")
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))


@pytest.mark.parametrize("damage", ["data", "manifest"])
def test_fallback_loads_the_next_older_and_quarantines_the_corrupt_one(two_steps, damage):
    root, states = two_steps
    step2 = root / step_dirname(2)
    if damage == "data":
        _flip_a_byte(step2)
    else:
        (step2 / "manifest.json").write_bytes(b"{")
    with pytest.raises(CheckpointCorruptError):  # strict by default: no silent fallback
        load_state(str(root))
    assert not (step2 / "CORRUPT").exists()

    model, opt = cm.build(seed=999)
    mgr = CheckpointManager(str(root))
    info = mgr.load({"app": AppState(model, opt)}, fallback=True)
    assert info.step == 1
    cm.assert_same(states[1], cm.full_state(model, opt))
    [(skipped, why)] = mgr.last_skipped
    assert skipped == 2 and ("manifest.json" in why or ".bin" in why), why
    marker = json.loads((step2 / "CORRUPT").read_text())
    assert marker["reason"] == why
    assert sorted(p.name for p in step2.iterdir()) >= ["COMMITTED", "CORRUPT"]  # kept
    assert [i.step for i in mgr.list()] == [1] and mgr.latest().step == 1
    with pytest.raises(CheckpointCorruptError, match="marked corrupt by an earlier load"):
        load_state(str(root), step=2)
    # The resumed run re-saves step 2: the quarantined directory is replaced.
    again = save_state(str(root), 2)
    assert not (step2 / "CORRUPT").exists()
    state, info = load_state(str(root))
    assert info.step == 2
    cm.assert_same(again, state)


def test_list_and_latest_skip_an_unreadable_manifest(two_steps):
    root, _ = two_steps
    (root / step_dirname(2) / "manifest.json").write_bytes(b"[]")
    mgr = CheckpointManager(str(root))
    assert [i.step for i in mgr.list()] == [1]
    assert mgr.latest().step == 1


def test_fallback_with_every_checkpoint_corrupt_raises(two_steps):
    root, _ = two_steps
    for s in (1, 2):
        _flip_a_byte(root / step_dirname(s))
    model, opt = cm.build(seed=999)
    with pytest.raises(CheckpointCorruptError, match="every committed checkpoint") as err:
        CheckpointManager(str(root)).load({"app": AppState(model, opt)}, fallback=True)
    assert "steps 2, 1" in str(err.value)
    assert CheckpointManager(str(root)).latest() is None


def fallback_ranks(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Collective: load with fallback (the damage is seen by some ranks only)."""
    model, opt = cm.build(seed=999)
    mgr = CheckpointManager(root)
    info = mgr.load({"app": AppState(model, opt)}, fallback=True)
    return {"step": info.step, "skipped": [s for s, _ in mgr.last_skipped],
            "state": cm.full_state(model, opt)}


def one_rank_cannot_open(rank: int, world_size: int, root: str) -> dict[str, Any]:
    """Collective: rank 1 alone fails to read the manifest (a flaky mount, say): every rank
    must raise the same typed error instead of the others blocking in ``dcp.load``."""
    from elastic_ckpt.checkpoint import catalog

    if rank == 1:
        def broken(self, step):
            raise CheckpointCorruptError("manifest.json unreadable here", file="manifest.json")
        catalog.Catalog.open = broken
    model, opt = cm.build(seed=999)
    try:
        CheckpointManager(root).load({"app": AppState(model, opt)})
    except CheckpointCorruptError as exc:
        return {"error": str(exc), "rank_detail": exc.details.get("rank")}
    return {"error": None}


@pytest.mark.dist
def test_multi_rank_fallback_and_one_sided_manifest_failure(two_steps, tmp_path):
    root, states = two_steps
    # The flipped byte sits in rows that only some of the 3 ranks read; all must fall back.
    _flip_a_byte(root / step_dirname(2))
    results = run_ranks(3, fallback_ranks, str(root), timeout_s=180)
    assert [(r["step"], r["skipped"]) for r in results] == [(1, [2])] * 3
    for r in results:
        cm.assert_same(states[1], r["state"])

    intact = tmp_path / "intact"
    save_state(str(intact), 1)
    outs = run_ranks(2, one_rank_cannot_open, str(intact), timeout_s=120)
    assert all(o["error"] and o["error"].endswith("manifest.json unreadable here") for o in outs)
    assert outs[0]["error"].startswith("rank 1: ") and outs[0]["rank_detail"] == 1
