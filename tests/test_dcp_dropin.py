"""``ShardWriter`` / ``ShardReader`` as drop-ins for DCP's ``FileSystemWriter`` /
``FileSystemReader``: plain ``dcp.save`` / ``dcp.load``, DCP's default planners and ours.

- On gloo at world sizes 1-4 (one spawned group per world size; each run loads what every
  earlier run saved, then its own): plain tensors, ShardedTensor, DTensor on 1-D and 2-D
  meshes, each loaded into other placements / mesh shapes / world sizes, bit-exact; JSON
  leaves; interop with ``CheckpointManager`` both ways; refused leaves raising on every rank.
- In one process: JSON leaves against FileSystemWriter's own result, refused leaves,
  ``checkpoint_id`` / ``reset`` / ``validate_checkpoint_id``, ``overwrite`` on and off, a
  ``file://`` and an ``s3://`` URI, and a save killed between truncating the rank file and
  committing.
"""

from __future__ import annotations

import io
import json
import os
import pickle
from pathlib import Path
from typing import Any

import pytest
from s3_server import moto_s3
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.multiprocessing as mp
from torch.distributed.checkpoint import (
    DefaultLoadPlanner,
    DefaultSavePlanner,
    FileSystemReader,
    FileSystemWriter,
)
from torch.distributed.checkpoint.api import CheckpointException

from elastic_ckpt.checkpoint import CheckpointManager, ShardReader, ShardWriter, verify
from elastic_ckpt.checkpoint.manifest import Manifest, encode_json_value
from elastic_ckpt.checkpoint.planners import JsonLoadPlanner, JsonSavePlanner
from elastic_ckpt.errors import CheckpointSaveError, NotCheckpointableError
from elastic_ckpt.train.local import run_ranks

pytestmark = [
    pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning"),
    pytest.mark.filterwarnings("ignore:Detected an existing checkpoint:UserWarning"),
]

PLANNERS = {"default": (DefaultSavePlanner, DefaultLoadPlanner),
            "json": (JsonSavePlanner, JsonLoadPlanner)}
META = {"x": 1, "s": "str", "tup": (1, {3: "three"}, 2.5), "inf": float("inf"), "none": None,
        "lst": [1, "a", None], "f": -0.5}
"""JSON leaves. DCP's flattening traverses every mapping (str()-ing its keys) and keeps tuples
and lists without tensors as leaves, so a non-string key survives only inside a leaf."""
MESH2 = {1: (1, 1), 2: (1, 2), 3: (3, 1), 4: (2, 2)}
"""The 2-D ("dp", "tp") mesh at each world size."""
RUNS = [(2, ()), (4, (2,)), (1, (2, 4)), (3, (1, 2, 4))]
"""(world size, world sizes whose checkpoints it loads besides its own), run in this order."""


def global_tensors() -> dict[str, torch.Tensor]:
    """The global values; shapes chosen so no sharded dim divides evenly by 2, 3 or 4."""
    g = torch.Generator().manual_seed(13)
    return {
        "a": torch.randn(37, 13, generator=g),
        "b": torch.randn(11, 29, generator=g, dtype=torch.float64),
        "c": torch.arange(23, dtype=torch.int64) * -7,
        "d": torch.randn(7, 5, generator=g).to(torch.bfloat16),
        "e": torch.randn(10, 9, generator=g),
        "st": torch.randn(19, 7, generator=g),
    }


# -- rank side --------------------------------------------------------------------------------
def _sharded_tensor(value: torch.Tensor, dim: int, world: int):
    from torch.distributed._shard import sharded_tensor
    from torch.distributed._shard.sharding_spec import ChunkShardingSpec

    spec = ChunkShardingSpec(dim=dim, placements=[f"rank:{r}/cpu" for r in range(world)])
    st = sharded_tensor.empty(spec, *value.shape, dtype=value.dtype)
    for shard in st.local_shards():
        box = tuple(slice(o, o + n) for o, n in zip(shard.metadata.shard_offsets,
                                                   shard.metadata.shard_sizes))
        shard.tensor.copy_(value[box])
    return st


_MESHES: dict[int, tuple[Any, Any]] = {}


def meshes(world: int) -> tuple[Any, Any]:
    """This rank's 1-D and 2-D meshes, made once (each makes process groups)."""
    if world not in _MESHES:
        from torch.distributed.device_mesh import init_device_mesh

        _MESHES[world] = (init_device_mesh("cpu", (world,)),
                          init_device_mesh("cpu", MESH2[world], mesh_dim_names=("dp", "tp")))
    return _MESHES[world]


def build_state(world: int, layout: str) -> dict[str, Any]:
    """The state as saved (``layout="save"``) or as a fresh destination to load into, in other
    placements, mesh shapes and tensor kinds (``"load"``; filled with -1, leaves None)."""
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh1, mesh2 = meshes(world)
    g = global_tensors()
    if layout == "save":
        return {
            "a": distribute_tensor(g["a"], mesh1, [Shard(0)]),
            "b": distribute_tensor(g["b"], mesh2, [Shard(0), Shard(1)]),
            "c": g["c"],
            "d": distribute_tensor(g["d"], mesh1, [Replicate()]),
            "e": distribute_tensor(g["e"], mesh2, [Replicate(), Shard(0)]),
            "st": _sharded_tensor(g["st"], 0, world),
            "meta": dict(META),
        }
    blank = {k: torch.full_like(v, -1) for k, v in g.items()}
    return {
        "a": distribute_tensor(blank["a"], mesh2, [Shard(1), Shard(0)]),
        "b": distribute_tensor(blank["b"], mesh1, [Shard(1)]),
        "c": distribute_tensor(blank["c"], mesh1, [Shard(0)]),
        "d": blank["d"],
        "e": distribute_tensor(blank["e"], mesh2, [Shard(1), Replicate()]),
        "st": _sharded_tensor(blank["st"], 1, world),
        "meta": {k: None for k in META},
    }


def gathered(state: dict[str, Any]) -> dict[str, Any] | None:
    """Collective: the loaded state as global tensors and leaves, on rank 0 (None elsewhere)."""
    from torch.distributed.tensor import DTensor

    out: dict[str, Any] = {}
    for key, value in state.items():
        if isinstance(value, DTensor):
            out[key] = value.full_tensor()
        elif hasattr(value, "local_shards"):  # ShardedTensor
            full = torch.empty(value.shape, dtype=value.dtype) if dist.get_rank() == 0 else None
            value.gather(dst=0, out=full)
            out[key] = full
        else:
            out[key] = value
    return out if dist.get_rank() == 0 else None


def _failures(exc: CheckpointException) -> dict[int, tuple[str, Any]]:
    out = {}
    for rank, failure in exc.failures.items():
        inner = failure[0] if isinstance(failure, tuple) else failure
        out[rank] = (type(inner).__name__, getattr(inner, "key", None), str(inner))
    return out


def refused_saves(rank: int, world: int, root: str) -> dict[str, Any]:
    """Non-JSON leaves under both planners: one every rank holds, one only the last rank has."""
    from torch.distributed.tensor import Shard, distribute_tensor

    t = distribute_tensor(torch.arange(10.0), meshes(world)[0], [Shard(0)])
    cases = {
        "everywhere": {"t": t, "meta": {"ok": 1, "blob": b"\x80\x04 bytes"}},
        "last_rank": {"t": t, "ok": 1, **({"obj": object()} if rank == world - 1 else {})},
        "bytesio": {"t": t, "buf": io.BytesIO(b"x")},
    }
    out = {}
    for planner_name, (save_planner, _) in PLANNERS.items():
        for case, state in cases.items():
            path = f"{root}/refused-w{world}-{planner_name}-{case}"
            try:
                dcp.save(state, storage_writer=ShardWriter(path), planner=save_planner())
                out[(planner_name, case)] = "saved"
            except CheckpointException as exc:
                files = sorted(os.listdir(path)) if os.path.isdir(path) else []
                out[(planner_name, case)] = (_failures(exc), files)
    return out


def conformance_run(rank: int, world: int, root: str,
                    sources: tuple[int, ...]) -> dict[str, Any]:
    for name, (save_planner, _) in PLANNERS.items():
        dcp.save(build_state(world, "save"), storage_writer=ShardWriter(f"{root}/w{world}-{name}"),
                 planner=save_planner())
    # Interop: ShardWriter into a step directory CheckpointManager lists, and the reverse.
    dcp.save({"app": build_state(world, "save")},
             storage_writer=ShardWriter(f"{root}/by-writer/step-{world:08d}"))
    CheckpointManager(f"{root}/by-manager-w{world}").save(world, {"app": build_state(world,
                                                                                      "save")})
    loaded: dict[tuple, Any] = {}
    for src in (*sources, world):
        for saved_with in PLANNERS:
            for loaded_with, (_, load_planner) in PLANNERS.items():
                state = build_state(world, "load")
                dcp.load(state, storage_reader=ShardReader(f"{root}/w{src}-{saved_with}"),
                         planner=load_planner())
                loaded[(src, saved_with, loaded_with)] = gathered(state)
        state = {"app": build_state(world, "load")}
        info = CheckpointManager(f"{root}/by-writer").load(state, step=src)
        assert info.step == src and info.world_size == src
        loaded[(src, "writer", "manager")] = gathered(state["app"])
        state = {"app": build_state(world, "load")}
        dcp.load(state, storage_reader=ShardReader(f"{root}/by-manager-w{src}/step-{src:08d}"))
        loaded[(src, "manager", "reader")] = gathered(state["app"])
    refused = refused_saves(rank, world, root)
    return {"loaded": loaded if rank == 0 else None, "refused": refused}


# -- the distributed runs ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Any]:
    root = str(tmp_path_factory.mktemp("dropin"))
    loaded, refused = {}, {}
    for world, sources in RUNS:
        outs = run_ranks(world, conformance_run, root, sources, timeout_s=280)
        loaded.update({(src, world, s, lw): v
                       for (src, s, lw), v in outs[0]["loaded"].items()})
        refused[world] = [o["refused"] for o in outs]
    return {"root": root, "loaded": loaded, "refused": refused}


def test_schedule_covers_growth_shrink_and_every_world_size() -> None:
    saved, pairs = set(), set()
    for world, sources in RUNS:
        assert set(sources) <= saved
        saved.add(world)
        pairs |= {(s, world) for s in (*sources, world)}
    assert saved == {1, 2, 3, 4}
    assert {(2, 4), (4, 1), (4, 3), (1, 3), (2, 1)} <= pairs  # 2-D (2, 2) mesh both ways


LOAD_CASES = sorted({(src, world) for world, sources in RUNS for src in (*sources, world)})


@pytest.mark.dist
@pytest.mark.parametrize(("src", "dst"), LOAD_CASES, ids=[f"{a}to{b}" for a, b in LOAD_CASES])
@pytest.mark.parametrize("saved_with", list(PLANNERS))
@pytest.mark.parametrize("loaded_with", list(PLANNERS))
def test_reshard_across_meshes_and_planners_is_exact(runs, src, dst, saved_with,
                                                     loaded_with) -> None:
    """1-D Shard(0) -> 2-D [Shard(1), Shard(0)]; 2-D -> 1-D Shard(1); plain -> DTensor;
    Replicate DTensor -> plain; [Replicate, Shard(0)] -> [Shard(1), Replicate];
    ShardedTensor chunked by rows -> by columns; at another world size."""
    got = runs["loaded"][(src, dst, saved_with, loaded_with)]
    for key, want in global_tensors().items():
        assert got[key].dtype == want.dtype, key
        assert torch.equal(got[key], want), key
    assert got["meta"] == META
    assert isinstance(got["meta"]["tup"], tuple) and 3 in got["meta"]["tup"][1]


@pytest.mark.dist
@pytest.mark.parametrize(("src", "dst"), LOAD_CASES, ids=[f"{a}to{b}" for a, b in LOAD_CASES])
def test_manager_and_plain_dcp_read_each_other(runs, src, dst) -> None:
    for direction in (("writer", "manager"), ("manager", "reader")):
        got = runs["loaded"][(src, dst, *direction)]
        for key, want in global_tensors().items():
            assert torch.equal(got[key], want), (direction, key)
        assert got["meta"] == META, direction


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_saved_layout_is_one_file_per_rank_json_objects(runs, world) -> None:
    for name in PLANNERS:
        directory = Path(runs["root"]) / f"w{world}-{name}"
        manifest = Manifest.from_json((directory / "manifest.json").read_bytes(), "m")
        assert sorted(p.name for p in directory.iterdir()) == sorted(
            ["COMMITTED", "manifest.json"] + [f"rank-{r:05d}.bin" for r in range(world)])
        assert manifest.world_size == world and manifest.step == 0
        assert manifest.tensors["a"].placements == ("Shard(dim=0)",)
        assert manifest.tensors["b"].placements == ("Shard(dim=0)", "Shard(dim=1)")
        assert len(manifest.tensors["b"].chunks) == world
        assert manifest.tensors["st"].placements is None
        assert len(manifest.tensors["st"].chunks) == world
        # Non-tensor leaves are JSON in the manifest; the data files hold tensor bytes only.
        assert manifest.objects == {f"meta.{k}": encode_json_value(v) for k, v in META.items()}
        data = sum((directory / f"rank-{r:05d}.bin").stat().st_size for r in range(world))
        assert data == manifest.total_bytes


@pytest.mark.dist
@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("planner", list(PLANNERS))
def test_refused_leaf_raises_on_every_rank_naming_it(runs, world, planner) -> None:
    for failures, files in (r[(planner, "everywhere")] for r in runs["refused"][world]):
        # Every rank holds the leaf, so every rank refuses it itself (deduplication would
        # have given the write to one rank only).
        assert sorted(failures) == list(range(world))
        for name, key, message in failures.values():
            assert (name, key) == ("NotCheckpointableError", "meta.blob")
            assert message.startswith("meta.blob: bytes is not checkpointable")
            assert "never pickle" in message
        assert "COMMITTED" not in files and not any(f.endswith(".bin") for f in files)
    last = world - 1
    for failures, files in (r[(planner, "last_rank")] for r in runs["refused"][world]):
        assert {r: f[:2] for r, f in failures.items()} == {last: ("NotCheckpointableError",
                                                                    "obj")}
        assert "COMMITTED" not in files and f"rank-{last:05d}.bin" not in files
        if planner == "json":  # refused while planning: no rank wrote anything
            assert not any(f.endswith(".bin") for f in files)
    for failures, _ in (r[(planner, "bytesio")] for r in runs["refused"][world]):
        assert {f[:2] for f in failures.values()} == {("NotCheckpointableError", "buf")}


# -- one process ------------------------------------------------------------------------------
def plain_state(scale: float = 1.0) -> dict[str, Any]:
    return {"w": torch.arange(12.0).reshape(3, 4) * scale,
            "n": {"i": torch.tensor([1, -2 ** 40]), "meta": dict(META)}, "top": 7}


def blank_state() -> dict[str, Any]:
    return {"w": torch.zeros(3, 4), "n": {"i": torch.zeros(2, dtype=torch.int64),
                                          "meta": {k: None for k in META}}, "top": None}


def same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return (type(a) is type(b) and len(a) == len(b)
                and all(same(x, y) for x, y in zip(a, b)))
    return type(a) is type(b) and (a == b or (a != a and b != b))


def loaded(path: Any) -> dict[str, Any]:
    """``blank_state()`` after ``dcp.load`` through a ``ShardReader`` of ``path``."""
    out = blank_state()
    dcp.load(out, storage_reader=ShardReader(path))
    return out


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict[str, Any]:
    """What DCP's own FileSystemWriter/FileSystemReader make of ``plain_state``."""
    path = tmp_path_factory.mktemp("fs") / "ckpt"
    dcp.save(plain_state(), storage_writer=FileSystemWriter(path))
    out = blank_state()
    dcp.load(out, storage_reader=FileSystemReader(path))
    return out


@pytest.mark.parametrize("saved_with", list(PLANNERS))
@pytest.mark.parametrize("loaded_with", list(PLANNERS))
def test_json_leaves_round_trip_as_with_filesystem_writer(tmp_path, reference, saved_with,
                                                          loaded_with) -> None:
    path = tmp_path / "ckpt"
    dcp.save(plain_state(), storage_writer=ShardWriter(path),
             planner=PLANNERS[saved_with][0]())
    out = blank_state()
    dcp.load(out, storage_reader=ShardReader(path), planner=PLANNERS[loaded_with][1]())
    assert same(out, reference) and same(out, plain_state())
    text = (path / "manifest.json").read_text()
    assert json.loads(text)["objects"]["n.meta.tup"] == encode_json_value(META["tup"])


def test_loading_leaves_never_unpickles_stored_bytes(tmp_path, monkeypatch) -> None:
    """With JsonLoadPlanner nothing is torch.load-ed; with DefaultLoadPlanner (which
    torch.load(weights_only=False)s what the reader hands it) the bytes are made by the
    reader from JSON and hold only plain containers: they load with weights_only=True."""
    path = tmp_path / "ckpt"
    dcp.save(plain_state(), storage_writer=ShardWriter(path))
    real_load = torch.load

    def no_load(*args, **kwargs):
        raise AssertionError("torch.load called")

    monkeypatch.setattr(torch, "load", no_load)
    out = blank_state()
    dcp.load(out, storage_reader=ShardReader(path), planner=JsonLoadPlanner())
    assert same(out, plain_state())
    seen = []

    def weights_only_load(f, *args, **kwargs):
        seen.append(f)
        return real_load(f, weights_only=True)

    monkeypatch.setattr(torch, "load", weights_only_load)
    out = blank_state()
    dcp.load(out, storage_reader=ShardReader(path), planner=DefaultLoadPlanner())
    assert same(out, plain_state()) and len(seen) == len(META) + 1


BAD_LEAVES = [(b"\x80\x04raw", "bytes"), (io.BytesIO(b"abc"), "BytesIO"),
              (object(), "object"), ({1, 2}, "set")]


@pytest.mark.parametrize(("leaf", "type_name"), BAD_LEAVES, ids=[t for _, t in BAD_LEAVES])
@pytest.mark.parametrize("planner", list(PLANNERS))
def test_non_json_leaf_is_refused_naming_its_key(tmp_path, leaf, type_name, planner) -> None:
    path = tmp_path / "ckpt"
    state = {"w": torch.ones(3), "opt": {"lr": 0.1, "bad": leaf}}
    with pytest.raises(CheckpointException) as err:
        dcp.save(state, storage_writer=ShardWriter(path), planner=PLANNERS[planner][0]())
    ((name, key, message),) = _failures(err.value).values()
    assert (name, key) == ("NotCheckpointableError", "opt.bad")
    assert message.startswith(f"opt.bad: {type_name} is not checkpointable")
    assert not path.exists() or not any(path.iterdir())  # nothing written, nothing pickled


def test_manager_surfaces_the_refusal_typed(tmp_path) -> None:
    mgr = CheckpointManager(str(tmp_path))
    with pytest.raises(NotCheckpointableError, match=r"app\.bad: bytes") as err:
        mgr.save(1, {"app": {"w": torch.ones(2), "bad": b"x"}})
    assert isinstance(err.value, CheckpointSaveError) and err.value.key == "app.bad"
    assert mgr.latest() is None


def test_planner_that_pickles_without_lookup_is_refused(tmp_path) -> None:
    class Opaque(DefaultSavePlanner):
        """No ``lookup_object``: the writer gets only resolve_data's torch.save bytes."""

        lookup_object = None

        def resolve_data(self, write_item):
            found = DefaultSavePlanner.lookup_object(self, write_item.index)
            return self.transform_object(write_item, found)

    with pytest.raises(CheckpointException) as err:
        dcp.save({"w": torch.ones(2), "x": 1}, storage_writer=ShardWriter(tmp_path / "c"),
                 planner=Opaque())
    ((name, key, message),) = _failures(err.value).values()
    assert (name, key) == ("NotCheckpointableError", "x") and "not JSON" in message


def test_checkpoint_id_replaces_the_path(tmp_path) -> None:
    a, b = tmp_path / "a", tmp_path / "b"
    writer = ShardWriter(a)
    dcp.save(plain_state(2.0), storage_writer=writer, checkpoint_id=b)
    assert not a.exists() and (b / "COMMITTED").exists()
    assert writer.checkpoint_id == str(b)
    first = writer.storage_meta().save_id
    writer.reset()  # no id: same place, a new save id (as FileSystemWriter)
    assert writer.checkpoint_id == str(b) and writer.storage_meta().save_id != first
    out = blank_state()
    dcp.load(out, storage_reader=ShardReader(a), checkpoint_id=f"file://{b}")
    assert same(out, plain_state(2.0))
    # A reader that already read one checkpoint forgets it on reset(another).
    c = tmp_path / "c"
    dcp.save(plain_state(3.0), storage_writer=ShardWriter(c))
    reader = ShardReader(b)
    dcp.load(blank_state(), storage_reader=reader)
    out = blank_state()
    dcp.load(out, storage_reader=reader, checkpoint_id=str(c))
    assert same(out, plain_state(3.0)) and reader.checkpoint_id == str(c)


def test_validate_checkpoint_id_matches_filesystem_writer(tmp_path) -> None:
    local = [tmp_path / "x", str(tmp_path / "x" / "y"), "relative/dir",
             str(tmp_path / "missing" / "deeper")]
    for cid in local:
        assert ShardWriter.validate_checkpoint_id(cid) == FileSystemWriter.validate_checkpoint_id(
            cid), cid
        assert ShardReader.validate_checkpoint_id(cid) == FileSystemReader.validate_checkpoint_id(
            cid), cid
    # Unlike FileSystemWriter, any URI pyarrow.fs opens is ours (checked without connecting).
    assert ShardWriter.validate_checkpoint_id("s3://bucket/run/step-00000001")
    assert ShardReader.validate_checkpoint_id(f"file://{tmp_path}/z")
    assert not ShardWriter.validate_checkpoint_id("nosuch://x")
    assert not ShardWriter.validate_checkpoint_id(17)


def test_step_dir_written_by_writer_is_a_manager_checkpoint(tmp_path) -> None:
    dcp.save({"app": plain_state()}, storage_writer=ShardWriter(tmp_path / "step-00000007"))
    mgr = CheckpointManager(str(tmp_path))
    assert mgr.latest().step == 7
    out = {"app": blank_state()}
    mgr.load(out)
    assert same(out["app"], plain_state())


def test_overwrite_false_refuses_a_committed_checkpoint(tmp_path) -> None:
    path = tmp_path / "ckpt"
    dcp.save(plain_state(1.0), storage_writer=ShardWriter(path))
    before = {p.name: p.read_bytes() for p in path.iterdir()}
    with pytest.raises(CheckpointException) as err:
        dcp.save(plain_state(5.0), storage_writer=ShardWriter(path, overwrite=False))
    ((name, _, message),) = _failures(err.value).values()
    assert name == "CheckpointSaveError" and "overwrite=False" in message
    assert {p.name: p.read_bytes() for p in path.iterdir()} == before
    assert same(loaded(path), plain_state(1.0))


def test_overwrite_true_replaces_it_and_drops_other_ranks_files(tmp_path) -> None:
    path = tmp_path / "ckpt"
    dcp.save(plain_state(1.0), storage_writer=ShardWriter(path))
    (path / "rank-00003.bin").write_bytes(b"from a save by more ranks")
    dcp.save(plain_state(5.0), storage_writer=ShardWriter(path, overwrite=True))
    assert sorted(p.name for p in path.iterdir()) == ["COMMITTED", "manifest.json",
                                                      "rank-00000.bin"]
    assert same(loaded(path), plain_state(5.0))


def test_uncommitted_debris_is_rewritten_even_without_overwrite(tmp_path) -> None:
    path = tmp_path / "ckpt"
    dcp.save(plain_state(1.0), storage_writer=ShardWriter(path))
    (path / "COMMITTED").unlink()
    dcp.save(plain_state(4.0), storage_writer=ShardWriter(path, overwrite=False))
    assert same(loaded(path), plain_state(4.0))


def test_ignored_options_are_accepted_and_extensions_refused(tmp_path) -> None:
    writer = ShardWriter(tmp_path / "c", single_file_per_rank=False, thread_count=4,
                         sync_files=False, per_thread_copy_ahead=0, cache_staged_state_dict=True)
    dcp.save(plain_state(), storage_writer=writer)
    assert sorted(p.name for p in (tmp_path / "c").iterdir()) == [
        "COMMITTED", "manifest.json", "rank-00000.bin"]
    with pytest.raises(ValueError, match="_extensions"):
        ShardWriter(tmp_path / "d", _extensions=[object()])
    ShardReader(tmp_path / "c", _extension_registry=None)
    with pytest.raises(CheckpointSaveError, match="use_collectives"):
        dcp.save(plain_state(), storage_writer=ShardWriter(tmp_path / "e"),
                 use_collectives=False)


KILLED = 86


def rewrite_and_die(path: str) -> None:
    """Child process: overwrite the checkpoint at ``path`` and die right after the first write
    into the truncated rank file: after the truncate, before any commit."""
    torch.set_num_threads(1)
    from elastic_ckpt.storage import fs

    real_write = fs._LocalWriter.write

    def write_half_then_die(self, data) -> int:
        view = memoryview(data).cast("B")
        real_write(self, view[: max(1, len(view) // 2)])
        os._exit(KILLED)

    fs._LocalWriter.write = write_half_then_die
    dcp.save({"app": plain_state(9.0)}, storage_writer=ShardWriter(path, overwrite=True))
    os._exit(0)  # the write never came


@pytest.mark.fault
def test_rewrite_killed_mid_write_leaves_the_old_checkpoint_committed(tmp_path) -> None:
    dcp.save({"app": plain_state(1.0)}, storage_writer=ShardWriter(tmp_path / "step-00000001"))
    step2 = tmp_path / "step-00000002"
    dcp.save({"app": plain_state(2.0)}, storage_writer=ShardWriter(step2))
    old = (step2 / "rank-00000.bin").read_bytes()
    proc = mp.get_context("spawn").Process(target=rewrite_and_die, args=(str(step2),))
    proc.start()
    proc.join(120)
    if proc.is_alive():
        proc.kill()
        proc.join()
    assert proc.exitcode == KILLED
    (aside,) = [p for p in step2.iterdir() if p.name.endswith(".tmp")]
    assert aside.name.startswith("rank-00000.bin.") and 0 < aside.stat().st_size < len(old)
    # The committed checkpoint was never touched: still committed, its data whole.
    assert (step2 / "rank-00000.bin").read_bytes() == old and (step2 / "COMMITTED").exists()
    mgr = CheckpointManager(str(tmp_path))
    assert [i.step for i in mgr.list()] == [1, 2]
    out = {"app": blank_state()}
    dcp.load(out, storage_reader=ShardReader(step2))
    assert same(out["app"], plain_state(2.0))
    verify(str(step2))
    # The next rewrite removes the debris and commits its own data.
    dcp.save({"app": plain_state(3.0)}, storage_writer=ShardWriter(step2, overwrite=True))
    assert sorted(p.name for p in step2.iterdir()) == ["COMMITTED", "manifest.json",
                                                       "rank-00000.bin"]
    out = {"app": blank_state()}
    dcp.load(out, storage_reader=ShardReader(step2))
    assert same(out["app"], plain_state(3.0))


def test_refused_leaf_in_a_rewrite_keeps_the_old_checkpoint(tmp_path) -> None:
    path = tmp_path / "ckpt"
    dcp.save(plain_state(1.0), storage_writer=ShardWriter(path))
    bad = {**plain_state(2.0), "blob": b"raw bytes"}
    with pytest.raises(CheckpointException, match="blob"):  # DCP's default planner
        dcp.save(bad, storage_writer=ShardWriter(path, overwrite=True))
    assert (path / "COMMITTED").exists()
    assert same(loaded(path), plain_state(1.0))


# -- object store -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def s3_query():
    with moto_s3("dropin") as (query, _):
        yield query


def test_s3_uri_save_overwrite_guard_and_load(s3_query) -> None:
    uri = f"s3://dropin/run/step-00000004?{s3_query}"
    dcp.save(plain_state(4.0), storage_writer=ShardWriter(uri))
    with pytest.raises(CheckpointException, match="overwrite=False"):
        dcp.save(plain_state(), storage_writer=ShardWriter(uri, overwrite=False))
    assert same(loaded(uri), plain_state(4.0))
    assert CheckpointManager(f"s3://dropin/run?{s3_query}").latest().step == 4
    # A rewrite on an object store: written aside, then moved in (a copy and a delete).
    dcp.save(plain_state(6.0), storage_writer=ShardWriter(uri, overwrite=True))
    assert same(loaded(uri), plain_state(6.0))
    verify(uri)


def test_errors_pickle_with_their_key() -> None:
    exc = NotCheckpointableError("k: bytes is not checkpointable", key="k")
    again = pickle.loads(pickle.dumps(exc))
    assert isinstance(again, TypeError) and again.key == "k"
