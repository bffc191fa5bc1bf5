"""Checkpoints on S3: the same code path users take on spot clusters (``s3://`` URIs through
``pyarrow.fs``), against a local S3 server (moto, bound to 127.0.0.1). Save, re-shard load at
another world size, list, retention, verify, the CLI, corruption and the fallback marker."""

from __future__ import annotations

from typing import Any

import pytest

import ckpt_models as cm
from elastic_ckpt.train.local import run_ranks
from elastic_ckpt import AppState, CheckpointCorruptError, CheckpointManager, verify
from elastic_ckpt.cli.main import main as cli_main
from elastic_ckpt.storage import Storage
from s3_server import moto_s3
from train_jobs import Segment, run_segments, smallest_config

pytestmark = pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")

pytest.importorskip("moto.server", reason="the test extra installs moto[server]")


@pytest.fixture(scope="module")
def s3_endpoint():
    """A moto S3 server on 127.0.0.1 with an empty bucket; yields the URI query that points
    pyarrow at it. Credentials come from the environment, as for real S3."""
    with moto_s3("ckpt-bucket") as (query, _):
        yield query


@pytest.fixture
def s3_root(s3_endpoint, request) -> str:
    return f"s3://ckpt-bucket/{request.node.name.replace('[', '-').rstrip(']')}?{s3_endpoint}"


def test_save_list_retain_load_verify_and_cli_on_s3(s3_root, capsys) -> None:
    mgr = CheckpointManager(s3_root, keep_last=2)
    states = {}
    for step in (1, 2, 3):
        states[step] = cm.save_state_at(mgr, step)
    assert [i.step for i in mgr.list()] == [2, 3]  # retention deleted step 1's objects
    latest = mgr.latest()
    # Checkpoint URIs keep the query at the end, so they open again as they are.
    assert latest.uri == s3_root.replace("?", "/step-00000003?")
    verify(latest.uri)
    model, opt = cm.build(seed=999)
    info = CheckpointManager(s3_root).load({"app": AppState(model, opt)})
    assert info.step == 3
    cm.assert_same(states[3], cm.full_state(model, opt))
    assert cli_main(["ls", s3_root]) == 0
    out = capsys.readouterr().out
    assert "step-00000003?" in out and "step-00000001" not in out
    assert cli_main(["verify", latest.uri]) == 0


def test_corrupt_object_is_named_and_fallback_marks_it_on_s3(s3_root) -> None:
    mgr = CheckpointManager(s3_root, keep_last=None)
    states = {s: cm.save_state_at(mgr, s) for s in (1, 2)}
    step2 = Storage(s3_root).child("step-00000002")
    data = step2.read_bytes("rank-00000.bin")
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x01
    step2.write_atomic("rank-00000.bin", bytes(flipped))
    with pytest.raises(CheckpointCorruptError, match="rank-00000.bin") as err:
        verify(step2.uri)
    assert err.value.tensor and err.value.tensor in str(err.value)
    model, opt = cm.build(seed=999)
    info = mgr.load({"app": AppState(model, opt)}, fallback=True)
    assert info.step == 1 and [s for s, _ in mgr.last_skipped] == [2]
    cm.assert_same(states[1], cm.full_state(model, opt))
    assert step2.exists("CORRUPT") and mgr.latest().step == 1


def save_then_reshard(rank: int, world_size: int, root: str, phase: str) -> dict[str, Any]:
    """Collective: ``save`` trains and saves at this world size; ``load`` loads it."""
    if phase == "save":
        return {"state": cm.save_state_at(CheckpointManager(root), 5)}
    model, opt = cm.build(seed=999)
    mgr = CheckpointManager(root)
    info = mgr.load({"app": AppState(model, opt)})
    return {"step": info.step, "state": cm.full_state(model, opt)}


@pytest.mark.dist
def test_reshard_2_to_3_through_s3(s3_root) -> None:
    saved = run_ranks(2, save_then_reshard, s3_root, "save", timeout_s=180)
    loaded = run_ranks(3, save_then_reshard, s3_root, "load", timeout_s=180)
    for out in loaded:
        assert out["step"] == 5
        cm.assert_same(saved[0]["state"], out["state"])


@pytest.mark.dist
def test_training_resumes_from_s3_at_another_world_size(s3_root) -> None:
    cfg = smallest_config(s3_root, max_steps=4, interval_steps=2)
    first = run_ranks(2, run_segments, [Segment(cfg, stop_at=3)], timeout_s=180)
    assert [o[0]["final_step"] for o in first] == [3, 3]  # stopped at 3, saved there
    resumed = run_ranks(1, run_segments, [Segment(cfg)], timeout_s=180)[0][0]
    assert (resumed["restored_step"], resumed["restored_from_world_size"],
            resumed["final_step"]) == (3, 2, 4)
    assert CheckpointManager(s3_root).latest().step == 4


def test_hf_export_to_s3(s3_root) -> None:
    import json

    import torch
    from safetensors.torch import load

    from elastic_ckpt.checkpoint.export_hf import export_hf
    from elastic_ckpt.errors import CheckpointError

    w = torch.randn(8, 4)
    record = {"class": "LlamaForCausalLM", "config": {"model_type": "llama"},
              "tied": [["emb", "head"]]}
    info = CheckpointManager(s3_root).save(1, {
        "app": {"model": {"emb": w, "head": w.clone(), "norm": torch.ones(4)}},
        "model": record})
    out = s3_root.replace("?", "/hf?")
    report = export_hf(info.uri, out, max_shard_size=8 * 4 * 4)  # one shard per tensor
    assert report.files == ("model-00001-of-00002.safetensors",
                            "model-00002-of-00002.safetensors",
                            "model.safetensors.index.json", "config.json")
    directory = Storage(out)
    index = json.loads(directory.read_bytes("model.safetensors.index.json"))
    assert index["weight_map"] == {"emb": report.files[0], "norm": report.files[1]}
    assert torch.equal(load(directory.read_bytes(report.files[0]))["emb"], w)
    assert json.loads(directory.read_bytes("config.json"))["architectures"] == [record["class"]]
    with pytest.raises(CheckpointError, match="is not empty"):
        export_hf(info.uri, out)
    assert export_hf(info.uri, out, overwrite=True).files == ("model.safetensors", "config.json")
    assert [name for name, _ in directory.listdir()] == ["config.json", "model.safetensors"]
