"""``elastic-ckpt ls | inspect | verify | export``: outputs, exit codes, error messages."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors.torch import load_file

from elastic_ckpt.checkpoint.catalog import open_checkpoint
from elastic_ckpt.checkpoint.manager import CheckpointManager
from elastic_ckpt.checkpoint.manifest import COMMITTED_FILE
from elastic_ckpt.cli.main import main
from elastic_ckpt.storage import Storage


def save(root, step: int, state: dict) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP: "assuming single process"
        return CheckpointManager(str(root), keep_last=None).save(step, state).uri


def model_state(seed: int) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"model": {"w": torch.randn(6, 4, generator=g),
                      "b": torch.randn(4, generator=g).to(torch.bfloat16)},
            "optim": {"lr": 0.5, "step": torch.tensor(3.0)},
            "data": {"cursor": 7}}


@pytest.fixture
def root(tmp_path):
    """Committed steps 10 and 20, and debris of a crashed save of step 30."""
    r = tmp_path / "ckpts"
    save(r, 10, model_state(1))
    save(r, 20, model_state(2))
    debris = r / "step-00000030"
    debris.mkdir()
    (debris / "rank-00000.bin").write_bytes(b"x" * 100)
    return r


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def flip_byte(ckpt_uri: str, fqn: str) -> str:
    """Flip one bit inside tensor ``fqn``'s first chunk; returns the file name."""
    _, manifest = open_checkpoint(Storage(ckpt_uri))
    chunk = manifest.tensors[fqn].chunks[0]
    path = os.path.join(ckpt_uri, chunk.file)
    data = bytearray(open(path, "rb").read())
    data[chunk.byte_offset + 1] ^= 0x10
    open(path, "wb").write(bytes(data))
    return chunk.file


# -- ls ----------------------------------------------------------------------------------------
def test_ls_lists_committed_oldest_first_and_marks_debris(root, capsys):
    code, out, _ = run(capsys, "ls", root)
    assert code == 0
    lines = out.splitlines()
    rows = [line.split() for line in lines if line.strip()[:2].isdigit()]
    assert [(r[0], r[1]) for r in rows] == [("10", "committed"), ("20", "committed"),
                                            ("30", "UNCOMMITTED")]
    assert rows[0][2] == "1" and rows[0][-1].endswith("step-00000010")
    assert "1 UNCOMMITTED directory" in out


def test_ls_json(root, capsys):
    code, out, _ = run(capsys, "ls", root, "--json")
    assert code == 0
    entries = json.loads(out)["checkpoints"]
    assert [(e["step"], e["status"]) for e in entries] == [
        (10, "committed"), (20, "committed"), (30, "uncommitted")]
    assert entries[0]["world_size"] == 1 and entries[0]["num_tensors"] == 3
    assert entries[0]["total_bytes"] == 6 * 4 * 4 + 4 * 2 + 4
    assert entries[2]["bytes_on_disk"] == 100 and entries[2]["has_manifest"] is False


def test_ls_shows_a_checkpoint_quarantined_by_a_fallback_load(root, capsys):
    flip_byte(str(root / "step-00000020"), "model.w")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        mgr = CheckpointManager(str(root))
        info = mgr.load(model_state(3), fallback=True)
    assert info.step == 10 and [s for s, _ in mgr.last_skipped] == [20]
    code, out, _ = run(capsys, "ls", root)
    rows = [line.split() for line in out.splitlines() if line.strip()[:2].isdigit()]
    assert code == 0 and [(r[0], r[1]) for r in rows] == [
        ("10", "committed"), ("20", "CORRUPT"), ("30", "UNCOMMITTED")]
    assert "step 20 was marked CORRUPT" in out and "model.w" in out


def test_ls_empty_missing_and_wrong_level(tmp_path, root, capsys):
    (tmp_path / "empty").mkdir()
    assert run(capsys, "ls", tmp_path / "empty")[1].startswith("no checkpoints under")
    code, _, err = run(capsys, "ls", tmp_path / "nope")
    assert code == 1 and "is not a directory" in err
    code, _, err = run(capsys, "ls", root / "step-00000010")
    assert code == 1 and "is a checkpoint, not a checkpoint root" in err


# -- inspect -----------------------------------------------------------------------------------
def test_inspect_text(root, capsys):
    code, out, _ = run(capsys, "inspect", root / "step-00000020")
    assert code == 0
    assert "step        20" in out and "world size  1" in out
    assert "elastic_ckpt v1" in out and "torch " + torch.__version__ in out
    assert "model.w  float32[6, 4]  plain tensor" in out
    assert "model.b  bfloat16[4]" in out
    assert "rank 0: rows [0, 6)" in out
    assert "optim.step  float32[]" in out and "rank 0: whole tensor" in out
    assert "objects (non-tensor leaves): 1" in out
    assert '"cursor": 7' in out


def test_inspect_json(root, capsys):
    code, out, _ = run(capsys, "inspect", root / "step-00000010", "--json")
    assert code == 0
    view = json.loads(out)
    assert view["step"] == 10 and view["world_size"] == 1 and view["format_version"] == 1
    tensors = {t["name"]: t for t in view["tensors"]}
    assert tensors["model.w"]["shape"] == [6, 4]
    assert tensors["model.w"]["chunks"][0]["rows"] == [0, 6]
    assert view["num_objects"] == 1 and view["objects"] == {"optim.lr": 0.5}
    assert view["extra"] == {"data": {"cursor": 7}}


def test_inspect_errors(root, capsys):
    code, _, err = run(capsys, "inspect", root / "step-00000030")
    assert code == 1 and "no COMMITTED marker" in err and "Traceback" not in err
    code, _, err = run(capsys, "inspect", root)
    assert code == 1 and "is a checkpoint root" in err and "step-00000020" in err
    code, _, err = run(capsys, "inspect", root / "step-00000099")
    assert code == 1 and "no checkpoint at" in err


# -- verify ------------------------------------------------------------------------------------
def test_verify_ok(root, capsys):
    code, out, _ = run(capsys, "verify", root / "step-00000010")
    assert code == 0
    assert out.startswith("OK ") and "3 tensors, 3 chunks" in out and "GB/s" in out
    code, out, _ = run(capsys, "verify", root / "step-00000010", "--json")
    report = json.loads(out)
    assert report["ok"] is True and report["bytes_checked"] > 0


def test_verify_flipped_byte_names_file_and_tensor(root, capsys):
    ckpt = str(root / "step-00000020")
    file = flip_byte(ckpt, "model.w")
    code, out, err = run(capsys, "verify", ckpt)
    assert code == 1 and out == ""
    assert "checksum mismatch" in err and file in err and "'model.w'" in err
    code, out, _ = run(capsys, "verify", ckpt, "--json")
    error = json.loads(out)["error"]
    assert code == 1 and error["type"] == "CheckpointCorruptError"
    assert error["file"] == file and error["tensor"] == "model.w"


def test_verify_not_committed_and_not_found(root, capsys):
    os.remove(root / "step-00000010" / COMMITTED_FILE)
    code, _, err = run(capsys, "verify", root / "step-00000010")
    assert code == 1 and "no COMMITTED marker" in err
    code, _, err = run(capsys, "verify", root / "step-00000077")
    assert code == 1 and "no checkpoint at" in err


def test_verify_in_a_subprocess_without_traceback(root):
    ckpt = str(root / "step-00000010")
    flip_byte(ckpt, "model.b")
    proc = subprocess.run([sys.executable, "-m", "elastic_ckpt.cli.main", "verify", ckpt],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert "elastic-ckpt verify: error: checksum mismatch" in proc.stderr
    assert "'model.b'" in proc.stderr and "Traceback" not in proc.stderr


# -- export ------------------------------------------------------------------------------------
def test_export_both_formats_bit_exact(root, tmp_path, capsys):
    state = model_state(2)["model"]
    st, pt = tmp_path / "m.safetensors", tmp_path / "m.pt"
    code, out, _ = run(capsys, "export", root / "step-00000020", st, "--prefix", "model.")
    assert code == 0 and "exported 2 tensors" in out and "1 tensors outside prefix" in out
    code, _, _ = run(capsys, "export", root / "step-00000020", pt, "--prefix", "model")
    assert code == 0
    for loaded in (load_file(str(st)), torch.load(str(pt), weights_only=True)):
        assert set(loaded) == {"w", "b"}
        for k, v in state.items():
            assert loaded[k].dtype == v.dtype and torch.equal(
                loaded[k].view(torch.uint8), v.view(torch.uint8)), k


def test_export_format_from_suffix_or_flag(root, tmp_path, capsys):
    ckpt = root / "step-00000010"
    code, _, err = run(capsys, "export", ckpt, tmp_path / "m.bin")
    assert code == 2 and "pass --format" in err
    code, out, _ = run(capsys, "export", ckpt, tmp_path / "m.bin", "--format", "torch", "--json")
    assert code == 0 and json.loads(out)["format"] == "torch"
    assert set(torch.load(str(tmp_path / "m.bin"), weights_only=True)) == {
        "model.w", "model.b", "optim.step"}


def test_export_errors(root, tmp_path, capsys):
    out = tmp_path / "m.safetensors"
    code, _, err = run(capsys, "export", root / "step-00000030", out)
    assert code == 1 and "no COMMITTED marker" in err and not out.exists()
    code, _, err = run(capsys, "export", root / "step-00000010", out, "--prefix", "nope")
    assert code == 1 and "no tensor key starts with 'nope.'" in err
    out.write_bytes(b"")
    code, _, err = run(capsys, "export", root / "step-00000010", out)
    assert code == 1 and "--overwrite" in err
    assert run(capsys, "export", root / "step-00000010", out, "--overwrite")[0] == 0


def test_usage_errors_and_help(capsys):
    assert run(capsys, "bogus")[0] == 2
    assert run(capsys)[0] == 2
    assert run(capsys, "export", "only-one-arg")[0] == 2
    code, out, _ = run(capsys, "export", "--help")
    assert code == 0 and "non-tensor objects" in out and "--prefix" in out
    for command in ("ls", "inspect", "verify"):
        assert run(capsys, command, "--help")[0] == 0


# -- a 2-rank FSDP2 checkpoint -----------------------------------------------------------------
def _fsdp_save(rank: int, world_size: int, root: str):
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import Shard, distribute_tensor

    from elastic_ckpt.checkpoint.app_state import AppState

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(5, 9), torch.nn.Linear(9, 3))
    mesh = init_device_mesh("cpu", (world_size,))
    for layer in model:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to(torch.bfloat16)
    cols = distribute_tensor(torch.arange(24.0).reshape(3, 8), mesh, [Shard(1)])
    CheckpointManager(root).save(4, {"app": AppState(model), "aux": {"cols": cols}})
    full = {f"app.model.{k}": v.full_tensor() for k, v in model.state_dict().items()}
    full["aux.cols"] = cols.full_tensor()
    return full


@pytest.mark.dist
def test_fsdp2_checkpoint_inspect_rows_and_export(tmp_path, capsys):
    from elastic_ckpt.train.local import run_ranks

    root = str(tmp_path / "ckpts")
    full = run_ranks(2, _fsdp_save, root)[0]
    ckpt = os.path.join(root, "step-00000004")

    code, out, _ = run(capsys, "inspect", ckpt)
    assert code == 0 and "world size  2" in out
    assert "app.model.0.weight  bfloat16[9, 5]  Shard(dim=0)" in out
    block = out.split("app.model.0.weight", 1)[1]
    assert "rank 0: rows [0, 5)" in block and "rank 1: rows [5, 9)" in block
    cols = out.split("aux.cols", 1)[1]
    assert "rank 0: box [0:3, 0:4]" in cols and "rank 1: box [0:3, 4:8]" in cols

    assert run(capsys, "verify", ckpt)[0] == 0
    st, pt = tmp_path / "m.safetensors", tmp_path / "all.pt"
    assert run(capsys, "export", ckpt, st, "--prefix", "app.model.")[0] == 0
    assert run(capsys, "export", ckpt, pt)[0] == 0
    model_sd = load_file(str(st))
    assert set(model_sd) == {k[len("app.model."):] for k in full if k.startswith("app.model.")}
    everything = torch.load(str(pt), weights_only=True)
    assert set(everything) == set(full)
    for key, tensor in full.items():
        assert torch.equal(everything[key], tensor), key
        if key.startswith("app.model."):
            assert model_sd[key[len("app.model."):]].dtype == torch.bfloat16
            assert torch.equal(model_sd[key[len("app.model."):]], tensor), key
