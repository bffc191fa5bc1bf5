"""``fault``: hostile checkpoints, fuzzed (hypothesis). A valid checkpoint's manifest is mutated
(field values, types, sizes, offsets, names, JSON structure) and its directory tampered with
(a symlink to a file outside, a directory where a file should be, a 1 PB declared tensor).
Every ``load``, ``verify``, ``inspect`` and ``export`` must either succeed with a valid result
or raise a typed ``ElasticCkptError``: never another exception, never a read of the file
outside the checkpoint directory, never an allocation beyond what the files hold."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from typing import Any

import pytest
import torch

from elastic_ckpt import CheckpointManager, ElasticCkptError, verify
from elastic_ckpt.checkpoint.catalog import open_checkpoint
from elastic_ckpt.checkpoint.export import export_checkpoint
from elastic_ckpt.checkpoint.export_hf import export_hf
from elastic_ckpt.checkpoint.manifest import MANIFEST_FILE
from elastic_ckpt.storage import Storage

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

pytestmark = [pytest.mark.fault]

SECRET = b"outside the checkpoint: never to be read" * 64


def _state(fill: float) -> dict[str, Any]:
    return {"model": {"w": torch.full((7, 5), fill), "b": torch.arange(6, dtype=torch.int64),
                      "h": torch.full((3,), fill, dtype=torch.bfloat16)},
            "meta": {"lr": 0.1, "name": "x"}}


@pytest.fixture(scope="module")
def valid(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("valid")
    CheckpointManager(str(root)).save(3, _state(1.5))
    return str(root)


# -- mutations -------------------------------------------------------------------------------
JSON_VALUES = st.one_of(st.none(), st.booleans(), st.integers(-2**63, 2**64),
                        st.floats(allow_nan=True), st.text(max_size=8),
                        st.lists(st.integers(-3, 10**6), max_size=4),
                        st.dictionaries(st.text(max_size=3), st.integers(), max_size=2))
PATHS_DEPTH = 6


def _paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    out = [prefix]
    if len(prefix) >= PATHS_DEPTH:
        return out
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


def _set(doc: Any, path: tuple, value: Any, delete: bool = False) -> Any:
    if not path:
        return value
    parent = doc
    for key in path[:-1]:
        parent = parent[key]
    if delete:
        del parent[path[-1]]
    else:
        parent[path[-1]] = value
    return doc


@st.composite
def manifest_mutation(draw, manifest: dict) -> dict:
    doc = copy.deepcopy(manifest)
    for _ in range(draw(st.integers(1, 3))):
        paths = _paths(doc)
        path = draw(st.sampled_from(paths))
        action = draw(st.sampled_from(["value", "delete", "scale", "rename", "dup_chunk"]))
        if action == "delete" and path:
            doc = _set(doc, path, None, delete=True)
        elif action == "scale" and path:
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            old = parent[path[-1]]
            if isinstance(old, int) and not isinstance(old, bool):
                parent[path[-1]] = draw(st.sampled_from(
                    [old + 1, old - 1, old * 2, -old, 0, 2**50, 2**62]))
            else:
                parent[path[-1]] = draw(JSON_VALUES)
        elif action == "rename" and path and isinstance(path[-1], str):
            parent = doc
            for key in path[:-1]:
                parent = parent[key]
            parent[draw(st.sampled_from(["../x", "", "a/b", path[-1] + "_", "w"]))] = \
                parent.pop(path[-1])
        elif action == "dup_chunk":
            for t in doc.get("tensors", {}).values() if isinstance(doc, dict) else ():
                if isinstance(t, dict) and isinstance(t.get("chunks"), list) and t["chunks"]:
                    t["chunks"].append(copy.deepcopy(t["chunks"][0]))
                    break
        else:
            doc = _set(doc, path, draw(JSON_VALUES))
    return doc


def _petabyte(manifest: dict) -> dict:
    """A tensor declared as 1 PB (shape, lengths and byte length consistent with each other),
    in a file of a few bytes."""
    doc = copy.deepcopy(manifest)
    fqn, t = next((k, v) for k, v in doc["tensors"].items() if len(v["shape"]) == 2)
    rows = 10**15 // 4 // t["shape"][1]
    t["shape"] = [rows, t["shape"][1]]
    chunk = t["chunks"][0]
    chunk["lengths"] = [rows, t["shape"][1]]
    chunk["byte_length"] = rows * t["shape"][1] * 4
    t["chunks"] = [chunk]
    # One checksum block as large as the tensor, so the checksum list stays consistent.
    doc["block_size_bytes"] = chunk["byte_length"]
    chunk["checksums"] = chunk["checksums"][:8]
    return doc


# -- the operations --------------------------------------------------------------------------
def _operations(ckpt: str, out_dir: str) -> list[tuple[str, Any]]:
    target = _state(0.0)
    return [("load", lambda: CheckpointManager(os.path.dirname(ckpt)).load(target, step=3)),
            ("verify", lambda: verify(ckpt)),
            ("inspect", lambda: open_checkpoint(Storage(ckpt))),
            ("export", lambda: export_checkpoint(ckpt, os.path.join(out_dir, "out.safetensors"),
                                                 "safetensors")),
            ("export-torch", lambda: export_checkpoint(ckpt, os.path.join(out_dir, "out.pt"),
                                                       "torch")),
            ("export-hf", lambda: export_hf(ckpt, os.path.join(out_dir, "hf")))]


def _run_all(root: str, secret_path: str) -> None:
    ckpt = os.path.join(root, "step-00000003")
    out_dir = tempfile.mkdtemp(dir=os.path.dirname(root))
    os.utime(secret_path, ns=(1, os.stat(secret_path).st_mtime_ns))  # a read moves atime
    before = os.stat(secret_path).st_atime_ns
    try:
        for name, op in _operations(ckpt, out_dir):
            try:
                op()
            except ElasticCkptError:
                pass
            except Exception as exc:  # the property: nothing but typed errors
                raise AssertionError(f"{name} raised {type(exc).__name__}: {exc}") from exc
    finally:
        shutil.rmtree(out_dir, ignore_errors=True)
    assert os.stat(secret_path).st_atime_ns == before, "a file outside the checkpoint was read"


def _copy(valid: str, tmp: str) -> str:
    root = os.path.join(tmp, "root")
    shutil.copytree(valid, root)
    return root


@pytest.fixture
def secret(tmp_path) -> str:
    path = tmp_path / "secret.bin"
    path.write_bytes(SECRET)
    return str(path)


def test_mutated_manifests_fail_typed(valid, secret) -> None:
    manifest = json.loads(open(os.path.join(valid, "step-00000003", MANIFEST_FILE)).read())

    @hypothesis.settings(max_examples=150, deadline=None,
                         suppress_health_check=list(hypothesis.HealthCheck))
    @hypothesis.given(doc=manifest_mutation(manifest))
    def prop(doc):
        with tempfile.TemporaryDirectory(dir=os.path.dirname(secret)) as tmp:
            root = _copy(valid, tmp)
            path = os.path.join(root, "step-00000003", MANIFEST_FILE)
            with open(path, "w") as f:
                f.write(json.dumps(doc))
            _run_all(root, secret)

    prop()


@pytest.mark.parametrize("tamper", ["symlink_out", "dir_for_file", "petabyte", "truncated_json",
                                    "manifest_symlink_out", "not_json"])
def test_tampered_directories_fail_typed(valid, secret, tmp_path, tamper) -> None:
    root = _copy(valid, str(tmp_path))
    step = os.path.join(root, "step-00000003")
    rank_file = os.path.join(step, "rank-00000.bin")
    manifest_path = os.path.join(step, MANIFEST_FILE)
    if tamper == "symlink_out":
        os.remove(rank_file)
        os.symlink(secret, rank_file)
    elif tamper == "manifest_symlink_out":
        os.remove(manifest_path)
        os.symlink(secret, manifest_path)
    elif tamper == "dir_for_file":
        os.remove(rank_file)
        os.mkdir(rank_file)
    elif tamper == "petabyte":
        doc = _petabyte(json.loads(open(manifest_path).read()))
        open(manifest_path, "w").write(json.dumps(doc))
    elif tamper == "truncated_json":
        data = open(manifest_path).read()
        open(manifest_path, "w").write(data[: len(data) // 2])
    elif tamper == "not_json":
        open(manifest_path, "wb").write(b"\xff\x00" * 10)
    _run_all(root, secret)
