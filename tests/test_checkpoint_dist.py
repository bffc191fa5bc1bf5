"""Save an FSDP2 model + AdamW at world size W, load it at W' into a fresh, differently
initialized model: every tensor must come back bit-identical, and training must go on as if
nothing happened.

Spawning ranks dominates the cost, so the checkpoints are made by a fixed schedule of runs
(module-scoped, run once): each run first loads the checkpoints it is the target of, then
saves its own. Five runs cover every (W -> W') pair in ``PAIRS``.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

import ckpt_models as cm
from elastic_ckpt.train.local import run_ranks
from elastic_ckpt import AppState, CheckpointManager
from elastic_ckpt.checkpoint.catalog import Catalog
from elastic_ckpt.storage import Storage

PAIRS = [(1, 3), (2, 1), (2, 3), (3, 2), (4, 3), (3, 4)]
# (world size, save its own checkpoint?, source world sizes it loads before saving)
RUNS = [(3, True, ()), (2, True, (3,)), (1, True, (2,)), (4, True, (3,)), (3, False, (1, 2, 4))]


def save_and_load(rank: int, world_size: int, root: str, save: bool,
                  sources: tuple[int, ...]) -> dict[str, Any] | None:
    loaded = {src: cm.load_fresh(f"{root}/w{src}") for src in sources}
    saved = cm.save_reference(f"{root}/w{world_size}", keep_last=None) if save else None
    return {"saved": saved, "loaded": loaded} if rank == 0 else None


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    """``{"root": ..., "saved": {W: ...}, "loaded": {(W, W'): ...}}`` from rank 0 of each run."""
    root = str(tmp_path_factory.mktemp("reshard"))
    saved, loaded = {}, {}
    for world_size, save, sources in RUNS:
        (out, *_) = run_ranks(world_size, save_and_load, root, save, sources, timeout_s=180)
        if save:
            saved[world_size] = out["saved"]
        loaded.update({(src, world_size): v for src, v in out["loaded"].items()})
    return {"root": root, "saved": saved, "loaded": loaded}


def test_schedule_covers_every_pair() -> None:
    covered, saved = set(), set()
    for world_size, save, sources in RUNS:
        assert set(sources) <= saved, "a run loads a checkpoint no earlier run saved"
        covered |= {(src, world_size) for src in sources}
        saved |= {world_size} if save else set()
    assert covered == set(PAIRS)


@pytest.mark.dist
@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{a}to{b}" for a, b in PAIRS])
def test_reshard_is_bit_exact(runs, src: int, dst: int) -> None:
    saved, loaded = runs["saved"][src], runs["loaded"][(src, dst)]
    # Model params, the int64 buffer, and AdamW exp_avg / exp_avg_sq / step per parameter FQN,
    # and param_groups (the target was built with lr=0.5 and had taken other steps).
    cm.assert_same(saved["state"], loaded["state"])
    assert loaded["state"]["optim"]["param_groups"][0]["lr"] == 1e-2
    assert set(loaded["state"]["optim"]["state"]) == {
        "emb.weight", "l1.weight", "l1.bias", "norm.weight", "norm.bias", "l2.weight", "l2.bias"}
    # A Stateful holding a bf16 DTensor, a 0-dim float64 and a 0-dim int64 tensor.
    cm.assert_same(saved["odd"], loaded["odd"])
    assert loaded["odd"]["bf16"].dtype == torch.bfloat16 and loaded["odd"]["scalar"].dim() == 0


@pytest.mark.dist
@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{a}to{b}" for a, b in PAIRS])
def test_training_continues_identically(runs, src: int, dst: int) -> None:
    saved, loaded = runs["saved"][src], runs["loaded"][(src, dst)]
    # The step after the checkpoint sees the same parameters and batch: the same loss, bit for
    # bit. The step after that went through a gradient reduction over a different number of
    # ranks, so it may differ in the last bits only.
    assert torch.equal(loaded["next_loss"], saved["next_loss"])
    torch.testing.assert_close(loaded["later_loss"], saved["later_loss"], rtol=1e-6, atol=0)


@pytest.mark.dist
@pytest.mark.parametrize(("src", "dst"), PAIRS, ids=[f"{a}to{b}" for a, b in PAIRS])
def test_extra_and_info_round_trip(runs, src: int, dst: int) -> None:
    saved, loaded = runs["saved"][src], runs["loaded"][(src, dst)]
    assert loaded["extra"] == cm.EXTRA  # updated in place; the stale key is gone
    assert isinstance(loaded["extra"]["pair"], tuple)
    assert isinstance(loaded["extra"]["nested"]["a"]["b"][1], tuple)
    assert 4 in loaded["extra"]["nested"]
    info = loaded["info"]
    assert (info.step, info.world_size, info.extra) == (cm.SAVE_STEP, src, {"extra": cm.EXTRA})
    assert info.uri == saved["info"].uri
    assert info.total_bytes == saved["info"].total_bytes
    assert info.num_tensors == saved["info"].num_tensors


@pytest.mark.dist
@pytest.mark.parametrize("src", [1, 2, 3, 4])
def test_saved_layout_is_sharded(runs, src: int) -> None:
    """Each rank wrote its own shard: one data file per rank, dim-0 chunks per DTensor."""
    directory, manifest = Catalog(Storage(f"{runs['root']}/w{src}")).open(cm.SAVE_STEP)
    assert manifest.world_size == src
    assert sorted(n for n, _ in directory.listdir() if n.endswith(".bin")) == [
        f"rank-{r:05d}.bin" for r in range(src)]
    emb = manifest.tensors["app.model.emb.weight"]
    assert emb.shape == (cm.VOCAB, cm.DIM) and emb.placements == ("Shard(dim=0)",)
    assert sorted(c.rank for c in emb.chunks) == list(range(src))
    assert sum(c.lengths[0] for c in emb.chunks) == cm.VOCAB
    seen = manifest.tensors["app.model.seen"]
    assert (seen.dtype, seen.placements, len(seen.chunks)) == ("int64", None, 1)


def test_single_process_without_process_group(tmp_path) -> None:
    """No torch.distributed at all: plain tensors, a plain nn.Module through AppState (with and
    without an optimizer), odd dtypes and JSON extras."""
    assert not torch.distributed.is_initialized()
    root = str(tmp_path)
    saved = cm.save_reference(root)
    assert saved["info"].world_size == 1
    loaded = cm.load_fresh(root)
    cm.assert_same(saved["state"], loaded["state"])
    cm.assert_same(saved["odd"], loaded["odd"])
    assert loaded["extra"] == cm.EXTRA
    assert torch.equal(loaded["next_loss"], saved["next_loss"])
    assert torch.equal(loaded["later_loss"], saved["later_loss"])

    mgr = CheckpointManager(root)
    module = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5))
    plain = {"w": torch.arange(6, dtype=torch.float16).reshape(2, 3),
             "nested": {"i": torch.tensor([1, -2**62], dtype=torch.int64)}}
    mgr.save(10, {"net": AppState(module), "plain": plain, "note": "hi"})
    module2 = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.LayerNorm(5))
    plain2 = {"w": torch.zeros(2, 3, dtype=torch.float16),
              "nested": {"i": torch.zeros(2, dtype=torch.int64)}}
    info = mgr.load({"net": AppState(module2), "plain": plain2})
    assert info.step == 10 and info.extra == {"note": "hi"}
    cm.assert_same(plain, plain2)
    cm.assert_same(module.state_dict(), module2.state_dict())
