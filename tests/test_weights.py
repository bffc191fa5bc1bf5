"""``open_weights``: row-ranged reads of pretrained weights (HF safetensors, sharded or not,
torch files, elastic_ckpt checkpoints), bit-exact, reading only the rows asked for."""

from __future__ import annotations

import json
import os
import random
import struct
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import save, save_file
from torch.distributed.tensor import DTensor

import ckpt_models as cm
from elastic_ckpt.checkpoint import AppState, CheckpointManager, open_weights
from elastic_ckpt.checkpoint.manifest import COMMITTED_FILE, step_dirname
from elastic_ckpt.errors import (
    CheckpointCorruptError,
    CheckpointNotCommittedError,
    WeightsCorruptError,
    WeightsError,
)
from elastic_ckpt.storage import fs as storage_fs
from elastic_ckpt.train import default_parallelize, device_mesh
from elastic_ckpt.train.local import run_ranks
from s3_server import moto_s3
from test_export import same_bits, write_grid_checkpoint


def row_ranges(n: int, rng: random.Random, count: int = 5) -> list[tuple[int, int]]:
    """Random ``[start, stop)`` ranges over ``n`` rows, plus the whole and an empty one."""
    ranges = [(0, n), (n // 2, n // 2)]
    for _ in range(count):
        a, b = sorted(rng.randint(0, n) for _ in range(2))
        ranges.append((a, b))
    return ranges


def check_source(source, expected: dict[str, torch.Tensor], seed: int = 0,
                 max_extra: int = 0) -> None:
    """Names, shapes and dtypes as expected; random row ranges of every tensor bit-exact;
    ``bytes_read`` grows by the bytes of the rows returned (plus at most ``max_extra``: a
    checkpoint's checksum-block edges)."""
    infos = source.tensors()
    assert set(infos) == set(expected)
    rng = random.Random(seed)
    for name, tensor in expected.items():
        info = infos[name]
        assert (info.shape, info.dtype) == (tuple(tensor.shape), tensor.dtype), name
        ranges = row_ranges(tensor.shape[0], rng) if tensor.dim() else [(0, 1)]
        for start, stop in ranges:
            before = source.bytes_read
            rows = source.read_rows(name, start, stop)
            want = tensor[start:stop] if tensor.dim() else tensor
            assert same_bits(rows, want), (name, start, stop)
            need = want.numel() * want.element_size()
            assert need <= source.bytes_read - before <= need + max_extra
        assert same_bits(source.read(name), tensor), name


# -- fixtures --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny HF Llama saved every way HF and torch save it: ``(state dict, {kind: uri})``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32))
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    root = tmp_path_factory.mktemp("llama")
    uris = {"hf_dir": str(root / "single"), "hf_sharded": str(root / "sharded"),
            "pt_file": str(root / "weights.pt"), "bin_dir": str(root / "bin"),
            "bin_sharded": str(root / "bin_sharded")}
    model.save_pretrained(uris["hf_dir"])
    model.save_pretrained(uris["hf_sharded"], max_shard_size="20KB")
    torch.save(state, uris["pt_file"])
    os.makedirs(uris["bin_dir"])
    torch.save(state, os.path.join(uris["bin_dir"], "pytorch_model.bin"))
    write_torch_shards(uris["bin_sharded"], state, parts=3)
    return state, uris


def write_torch_shards(directory: str, state: dict[str, torch.Tensor], parts: int) -> None:
    """``pytorch_model-0000i-of-0000n.bin`` files plus their ``pytorch_model.bin.index.json``,
    as transformers wrote sharded torch checkpoints."""
    os.makedirs(directory)
    names = list(state)
    weight_map = {}
    for i in range(parts):
        file = f"pytorch_model-{i + 1:05d}-of-{parts:05d}.bin"
        part = {n: state[n] for n in names[i::parts]}
        torch.save(part, os.path.join(directory, file))
        weight_map.update({n: file for n in part})
    with open(os.path.join(directory, "pytorch_model.bin.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": 0}, "weight_map": weight_map}, f)


def bf16_set() -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    bits = torch.randint(-2**15, 2**15, (9, 4, 3), generator=g, dtype=torch.int16)
    return {"cube": bits.view(torch.bfloat16),  # arbitrary bit patterns, NaNs included
            "vec": torch.randn(11, generator=g).to(torch.bfloat16),
            "scalar": torch.tensor(1.5, dtype=torch.bfloat16),
            "empty": torch.empty(0, 5, dtype=torch.bfloat16)}


# -- HF / torch / safetensors formats ------------------------------------------------------
@pytest.mark.parametrize("kind", ["hf_dir", "hf_sharded", "pt_file", "bin_dir", "bin_sharded"])
def test_llama_rows_are_exact(llama, kind):
    state, uris = llama
    with open_weights(uris[kind]) as source:
        check_source(source, state, seed=sum(map(ord, kind)))
        assert source.format == ("safetensors" if kind.startswith("hf") else "torch")


def test_sharded_index_names_each_tensors_file(llama):
    state, uris = llama
    index = json.load(open(os.path.join(uris["hf_sharded"], "model.safetensors.index.json")))
    with open_weights(uris["hf_sharded"]) as source:
        assert source.uri.endswith("model.safetensors.index.json")
        files = {n: os.path.basename(i.file) for n, i in source.tensors().items()}
    assert files == index["weight_map"] and len(set(files.values())) > 2


def test_bf16_safetensors_file(tmp_path):
    tensors = bf16_set()
    save_file(tensors, str(tmp_path / "w.safetensors"), metadata={"format": "pt"})
    with open_weights(str(tmp_path / "w.safetensors")) as source:
        check_source(source, tensors)
        assert source.metadata == {"format": "pt"}


def test_safetensors_reads_exactly_the_rows_byte_range(llama, monkeypatch):
    """One ranged read per call, at the rows' offset, of the rows' length: nothing else."""
    state, uris = llama
    path = os.path.join(uris["hf_dir"], "model.safetensors")
    raw = open(path, "rb").read()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    reads: list[tuple[int, int]] = []
    original = storage_fs._LocalReader.read_into

    def spy(self, offset, buf):
        reads.append((offset, memoryview(buf).nbytes))
        return original(self, offset, buf)

    with open_weights(uris["hf_dir"]) as source:
        monkeypatch.setattr(storage_fs._LocalReader, "read_into", spy)
        for name in ("model.embed_tokens.weight", "model.layers.1.mlp.down_proj.weight"):
            tensor = state[name]
            row_bytes = tensor[0].numel() * tensor.element_size()
            for start, stop in [(3, 9), (0, 1), (31, 32)]:
                reads.clear()
                source.read_rows(name, start, stop)
                begin = 8 + n + header[name]["data_offsets"][0]
                assert reads == [(begin + start * row_bytes, (stop - start) * row_bytes)]
        reads.clear()
        source.read_rows("model.norm.weight", 5, 5)
        assert reads == []  # an empty shard reads nothing


def test_one_rank_of_w_reads_one_wth_of_the_model(llama):
    """The pretrained-start pattern: each of W ranks reads its FSDP2 Shard(0) rows of every
    tensor; together they read the model exactly once and rebuild it."""
    state, uris = llama
    total = sum(t.numel() * t.element_size() for t in state.values())
    world = 3
    per_rank, rebuilt = [], {name: [] for name in state}
    for rank in range(world):
        with open_weights(uris["hf_sharded"]) as source:
            for name, info in source.tensors().items():
                size = -(-info.num_rows // world)  # torch.chunk, as FSDP2 shards dim 0
                start, stop = min(rank * size, info.num_rows), min((rank + 1) * size,
                                                                   info.num_rows)
                rebuilt[name].append(source.read_rows(name, start, stop))
            per_rank.append(source.bytes_read)
    assert sum(per_rank) == total
    assert max(per_rank) < total / world * 1.2
    for name, tensor in state.items():
        assert same_bits(torch.cat(rebuilt[name]), tensor), name


def test_concurrent_reads_share_one_source(llama):
    state, uris = llama
    jobs = [(name, a, b) for name, t in state.items()
            for a, b in row_ranges(t.shape[0], random.Random(name), count=3)]
    with open_weights(uris["hf_sharded"]) as source, ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda job: source.read_rows(*job), jobs))
        for (name, a, b), rows in zip(jobs, results):
            assert same_bits(rows, state[name][a:b])
        assert source.bytes_read == sum(r.numel() * r.element_size() for r in results)


def test_read_into_a_caller_buffer(tmp_path):
    tensors = bf16_set()
    save_file(tensors, str(tmp_path / "w.safetensors"))
    torch.save(tensors, str(tmp_path / "w.pt"))
    for file in ("w.safetensors", "w.pt"):
        with open_weights(str(tmp_path / file)) as source:
            out = torch.empty(3, 4, 3, dtype=torch.bfloat16)
            assert source.read_rows("cube", 2, 5, out=out) is out
            assert same_bits(out, tensors["cube"][2:5])
            with pytest.raises(ValueError, match=r"dtype torch.bfloat16 and shape \[3, 4, 3\]"):
                source.read_rows("cube", 2, 5, out=torch.empty(3, 4, 3))
            with pytest.raises(ValueError, match="not contiguous"):
                source.read_rows("cube", 2, 5, out=torch.empty(
                    3, 3, 4, dtype=torch.bfloat16).transpose(1, 2))


def test_legacy_torch_format_loads_whole(tmp_path, caplog):
    tensors = {"w": torch.randn(5, 2), "b": torch.arange(3)}
    torch.save(tensors, str(tmp_path / "old.bin"), _use_new_zipfile_serialization=False)
    with open_weights(str(tmp_path / "old.bin")) as source:
        check_source(source, tensors)
    assert "loading it whole" in caplog.text


def test_file_uri_and_closed_source(tmp_path):
    tensors = {"w": torch.randn(4, 3)}
    save_file(tensors, str(tmp_path / "w.safetensors"))
    source = open_weights(f"file://{tmp_path}/w.safetensors")
    check_source(source, tensors)
    source.close()
    source.close()  # idempotent
    with pytest.raises(WeightsError, match="closed"):
        source.read_rows("w", 0, 1)


# -- elastic_ckpt checkpoints ---------------------------------------------------------------
def save_fsdp_checkpoints(rank: int, world_size: int, root: str) -> list | None:
    """FSDP2 ``ToyModel`` (every layer its own unit) saved as steps 1 and 2 (changed params
    between); returns both full model state dicts from rank 0."""
    torch.manual_seed(0)
    model = cm.ToyModel()
    default_parallelize(model, device_mesh(torch.device("cpu")),
                        units=lambda m: [m.emb, m.l1, m.norm, m.l2])
    mgr = CheckpointManager(root, keep_last=None, block_size_bytes=64)
    states = []
    for step in (1, 2):
        with torch.no_grad():
            for p in model.parameters():
                p.mul_(-step)
            model.seen.add_(step)
        states.append({k: (v.full_tensor() if isinstance(v, DTensor) else v).detach().clone()
                       for k, v in model.state_dict().items()})
        mgr.save(step, {"app": AppState(model), "extra": {"step": step}})
    return states if rank == 0 else None


@pytest.fixture(scope="module")
def fsdp_ckpt(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("fsdp") / "ckpts")
    states, _ = run_ranks(2, save_fsdp_checkpoints, root, timeout_s=180)
    return root, states


@pytest.mark.dist
def test_checkpoint_root_and_step_dir(fsdp_ckpt):
    root, (step1, step2) = fsdp_ckpt
    with open_weights(root) as source:  # the root: its latest committed step
        assert (source.format, source.step) == ("elastic_ckpt", 2)
        assert source.uri.endswith(step_dirname(2))
        assert set(source.tensors()) == set(step2) == {
            "emb.weight", "l1.weight", "l1.bias", "norm.weight", "norm.bias", "l2.weight",
            "l2.bias", "seen"}
        read_all_ranges(source, step2)
    with open_weights(f"{root}/{step_dirname(1)}") as source:
        assert source.step == 1
        read_all_ranges(source, step1)


def read_all_ranges(source, expected: dict[str, torch.Tensor]) -> None:
    rng = random.Random(1)
    for name, tensor in expected.items():
        for start, stop in row_ranges(tensor.shape[0], rng):
            assert same_bits(source.read_rows(name, start, stop), tensor[start:stop]), name


@pytest.mark.dist
def test_checkpoint_reads_only_overlapping_chunks(fsdp_ckpt):
    """A rank of W=3 reads its rows from a W=2 save: its bytes, plus at most the partial
    64-byte checksum blocks at the ends of the (at most 2) chunks it touches."""
    root, (_, step2) = fsdp_ckpt
    emb = step2["emb.weight"]  # 37 rows: saved as 19 + 18, read as 13 + 13 + 11
    for rank in range(3):
        with open_weights(root) as source:
            start, stop = min(13 * rank, 37), min(13 * (rank + 1), 37)
            assert same_bits(source.read_rows("emb.weight", start, stop), emb[start:stop])
            need = (stop - start) * emb[0].numel() * 4
            assert need <= source.bytes_read <= need + 2 * 2 * 64


def test_checkpoint_chunks_that_are_not_whole_rows(tmp_path):
    """Column shards and 2-D grids (not FSDP2's layout, but valid checkpoints)."""
    g = torch.Generator().manual_seed(1)
    full = {"cols": torch.randn(9, 10, generator=g),
            "grid": torch.randn(6, 8, 5, generator=g).to(torch.bfloat16),
            "rows": torch.arange(12, dtype=torch.int32).reshape(4, 3)}
    uri = write_grid_checkpoint(tmp_path, full, {"cols": (1, 2), "grid": (2, 2, 1),
                                                 "rows": (2, 1)})
    with open_weights(uri, checkpoint_prefix="") as source:
        read_all_ranges(source, full)


def test_checkpoint_scalar_and_prefix(tmp_path):
    tensors = {"w": torch.randn(5, 2), "s": torch.tensor(2.5, dtype=torch.float64)}
    mgr = CheckpointManager(str(tmp_path), keep_last=None, block_size_bytes=16)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP: "assuming single process"
        mgr.save(1, {"app": {"model": tensors, "lr": 0.1}, "other": {"t": torch.ones(2)}})
    with open_weights(str(tmp_path)) as source:  # one chunk per tensor: 2 partial blocks
        check_source(source, tensors, max_extra=2 * 16)
    with pytest.raises(WeightsError, match=r"'model\.'.*app\.model\. other\..*checkpoint_prefix"):
        open_weights(str(tmp_path), checkpoint_prefix="model")


@pytest.mark.dist
def test_uncommitted_and_corrupt_checkpoints(fsdp_ckpt, tmp_path):
    root, _ = fsdp_ckpt
    import shutil

    copy = tmp_path / "copy"
    shutil.copytree(root, copy)
    os.remove(copy / step_dirname(2) / COMMITTED_FILE)
    with pytest.raises(CheckpointNotCommittedError):
        open_weights(str(copy / step_dirname(2)))
    with open_weights(str(copy)) as source:  # the root falls to the newest committed step
        assert source.step == 1
    data = copy / step_dirname(1) / "rank-00001.bin"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0xFF
    data.write_bytes(bytes(raw))
    with open_weights(str(copy)) as source, pytest.raises(CheckpointCorruptError,
                                                          match="checksum mismatch"):
        for name, info in source.tensors().items():
            source.read(name)
    os.remove(copy / step_dirname(1) / COMMITTED_FILE)
    with pytest.raises(WeightsError, match=r"no committed step .*\[1, 2\]"):
        open_weights(str(copy))


# -- errors ----------------------------------------------------------------------------------
def test_nothing_usable_lists_what_was_looked_for(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(WeightsError, match=r"no weights in .*model\.safetensors, model\."
                                           r"safetensors\.index\.json, pytorch_model\.bin.*"
                                           r"It holds: config\.json"):
        open_weights(str(tmp_path))
    with pytest.raises(WeightsError, match="nothing at"):
        open_weights(str(tmp_path / "absent"))
    (tmp_path / "w.npz").write_bytes(b"x")
    with pytest.raises(WeightsError, match="cannot tell the format"):
        open_weights(str(tmp_path / "w.npz"))


def test_unknown_name_suggests_close_ones(llama):
    _, uris = llama
    with open_weights(uris["hf_dir"]) as source:
        with pytest.raises(WeightsError, match=r"no tensor 'model\.norm\.weigth'.*"
                                               r"model\.norm\.weight") as err:
            source.read_rows("model.norm.weigth", 0, 1)
        assert err.value.tensor == "model.norm.weigth"
        with pytest.raises(WeightsError, match=r"close names: .*model\.layers\.0\.mlp\."
                                               r"up_proj\.weight"):
            source.info("layers.0.mlp.up_proj.weight")  # an unprefixed training name


def test_rows_out_of_range(tmp_path):
    save_file({"w": torch.randn(4, 3), "s": torch.tensor(1.0)}, str(tmp_path / "w.safetensors"))
    with open_weights(str(tmp_path / "w.safetensors")) as source:
        for start, stop in [(-1, 2), (0, 5), (3, 2)]:
            with pytest.raises(WeightsError, match=rf"rows \[{start}, {stop}\) .*'w'.*"
                                                   r"0 <= start <= stop <= 4"):
                source.read_rows("w", start, stop)
        with pytest.raises(WeightsError, match="0-dim: its only row range is start=0, stop=1"):
            source.read_rows("s", 0, 0)
        with pytest.raises(TypeError, match="must be ints"):
            source.read_rows("w", 0.5, 2)
        assert source.bytes_read == 0


def header_file(path, header: dict, data: bytes) -> str:
    text = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)
    return str(path)


@pytest.mark.parametrize(("header", "data", "match"), [
    ({"w": {"dtype": "F32", "shape": [250], "data_offsets": [0, 1000]}}, b"\0" * 16,
     r"'w' needs bytes \[\d+, \d+\) but the file has \d+ bytes"),
    ({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 16]}}, b"\0" * 16,
     r"'w': data_offsets \[0, 16\] span 16 bytes but shape \[3\] of F32 needs 12"),
    ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
      "b": {"dtype": "U8", "shape": [4], "data_offsets": [4, 8]}}, b"\0" * 8,
     r"tensors 'a' and 'b' overlap"),
    ({"w": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 0]}}, b"",
     r"'w': shape \[-1\] is not a list of non-negative ints"),
    ({"w": {"dtype": "F32", "shape": [1], "data_offsets": [8, 4]}}, b"\0" * 8,
     r"'w': data_offsets \[8, 4\] is not \[begin, end\]"),
    ({"w": {"shape": [1]}}, b"", r"'w': header entry .* lacks dtype"),
    ([1, 2], b"", r"JSON header that is a list"),
    ({"__metadata__": "x"}, b"", r"__metadata__ that is a str"),
])
def test_malformed_safetensors_header(tmp_path, header, data, match):
    path = header_file(tmp_path / "bad.safetensors", header, data)
    with pytest.raises(WeightsCorruptError, match=match) as err:
        open_weights(path)
    assert err.value.file == path and isinstance(err.value, CheckpointCorruptError)
    assert "Re-download" in str(err.value)


def test_unsupported_dtype_is_not_called_corrupt(tmp_path):
    path = header_file(tmp_path / "c.safetensors",
                       {"z": {"dtype": "C64", "shape": [1], "data_offsets": [0, 8]}}, b"\0" * 8)
    with pytest.raises(WeightsError, match=r"'z' has safetensors dtype 'C64'.*supported: F64") \
            as err:
        open_weights(path)
    assert not isinstance(err.value, WeightsCorruptError)


def test_truncated_safetensors_file(tmp_path):
    path = tmp_path / "t.safetensors"
    save_file({"a": torch.randn(8, 8), "b": torch.randn(8, 8)}, str(path))
    raw = path.read_bytes()
    path.write_bytes(raw[:-10])
    with pytest.raises(WeightsCorruptError, match=r"needs bytes .*truncated") as err:
        open_weights(str(path))
    assert err.value.tensor in ("a", "b")
    path.write_bytes(raw[:20])  # inside the header
    with pytest.raises(WeightsCorruptError, match=r"declares a \d+-byte header but has only "
                                                  r"20 bytes"):
        open_weights(str(path))
    path.write_bytes(raw[:5])
    with pytest.raises(WeightsCorruptError, match="too short"):
        open_weights(str(path))
    path.write_bytes(b"\xff" * 8 + raw[8:])
    with pytest.raises(WeightsCorruptError, match="not a safetensors file"):
        open_weights(str(path))


@pytest.mark.parametrize(("obj", "match"), [
    ({"w": torch.ones(2), "step": 3}, r"not a flat dict of dense tensors: 'step' \(int\)\. "
                                      r"Keep only the tensors"),
    ({"state_dict": {"w": torch.ones(2)}, "epoch": 1},
     r"'state_dict' \(dict with keys \['w'\]\).*wrapper.*obj\['state_dict'\]"),
    ({"model": {"w": torch.ones(2)}}, r"under 'model'"),
    ([torch.ones(2)], r"holds a list, not a dict"),
    ({0: torch.ones(2)}, r"0 \(int key, not str\)"),
    ({"sp": torch.eye(2).to_sparse()}, r"'sp' \(torch.sparse_coo tensor\)"),
])
def test_torch_file_must_be_a_flat_dict_of_tensors(tmp_path, obj, match):
    torch.save(obj, str(tmp_path / "x.pt"))
    with pytest.raises(WeightsError, match=match) as err:
        open_weights(str(tmp_path / "x.pt"))
    assert err.value.file == str(tmp_path / "x.pt")


def test_torch_file_corrupt_or_unsafe(tmp_path):
    (tmp_path / "junk.bin").write_bytes(b"not a torch file at all")
    with pytest.raises(WeightsCorruptError, match="cannot be loaded as a torch file "
                                                  r"\(UnpicklingError: Unsupported operand"):
        open_weights(str(tmp_path / "junk.bin"))
    torch.save({"w": torch.ones(100)}, str(tmp_path / "cut.pt"))
    raw = (tmp_path / "cut.pt").read_bytes()
    (tmp_path / "cut.pt").write_bytes(raw[:len(raw) // 2])
    with pytest.raises(WeightsCorruptError, match="cut.pt cannot be loaded as a torch file"):
        open_weights(str(tmp_path / "cut.pt"))
    torch.save({"w": torch.ones(2), "m": torch.nn.Linear(2, 2)}, str(tmp_path / "mod.pt"))
    with pytest.raises(WeightsError, match=r"refuses \(Unsupported global: GLOBAL torch\.nn\."
                                           r"modules\.linear\.Linear.*\); arbitrary pickles") \
            as err:
        open_weights(str(tmp_path / "mod.pt"))
    assert not isinstance(err.value, WeightsCorruptError)


def test_broken_indexes(llama, tmp_path):
    state, _ = llama
    directory = tmp_path / "m"
    write_torch_shards(str(directory), state, parts=2)
    index_path = directory / "pytorch_model.bin.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["extra.weight"] = index["weight_map"]["lm_head.weight"]
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightsCorruptError, match=r"maps tensor 'extra\.weight' to "
                                                  r"pytorch_model-0000\d-of-00002\.bin, but"):
        open_weights(str(directory))
    index["weight_map"]["extra.weight"] = "pytorch_model-00009-of-00002.bin"
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightsCorruptError, match="00009-of-00002.bin, which is missing"):
        open_weights(str(directory))
    index["weight_map"]["extra.weight"] = "../elsewhere.bin"
    index_path.write_text(json.dumps(index))
    with pytest.raises(WeightsCorruptError, match="not a file name inside its directory"):
        open_weights(str(directory))
    index_path.write_text('{"metadata": {}}')
    with pytest.raises(WeightsCorruptError, match="no 'weight_map'"):
        open_weights(str(index_path))  # an index file can be passed directly, too


# -- any pyarrow.fs URI ------------------------------------------------------------------------
def test_s3_safetensors_sharded_and_torch(llama, tmp_path, monkeypatch):
    state, uris = llama
    with moto_s3("weights") as (query, fs):
        pafs = pytest.importorskip("pyarrow.fs")
        for kind in ("hf_sharded", "pt_file"):
            pafs.copy_files(uris[kind], f"weights/{os.path.basename(uris[kind])}",
                            destination_filesystem=fs)
        monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
        for name in ("sharded", "weights.pt"):
            with open_weights(f"s3://weights/{name}?{query}") as source:
                check_source(source, state)
                # A torch file is read from a local temporary copy, removed on close.
                assert len(os.listdir(tmp_path)) == (name == "weights.pt")
            assert os.listdir(tmp_path) == []
        file = os.path.basename(json.load(open(os.path.join(
            uris["hf_sharded"], "model.safetensors.index.json")))["weight_map"]["lm_head.weight"])
        with open_weights(f"s3://weights/sharded/{file}?{query}") as source:
            assert same_bits(source.read_rows("lm_head.weight", 5, 9), state["lm_head.weight"][5:9])


# -- property ----------------------------------------------------------------------------------
def test_safetensors_property():
    hypothesis = pytest.importorskip("hypothesis")
    st = hypothesis.strategies
    from elastic_ckpt.checkpoint.safetensors_format import DTYPES

    def tensor_for(dtype, shape, seed):
        g = torch.Generator().manual_seed(seed)
        if dtype == torch.bool:
            return torch.randint(0, 2, shape, generator=g).bool()
        nbytes = dtype.itemsize * int(torch.Size(shape).numel())
        raw = torch.randint(0, 256, (nbytes,), generator=g, dtype=torch.uint8)
        return raw.view(dtype).reshape(shape)

    tensor_spec = st.tuples(st.sampled_from(sorted(DTYPES.values(), key=str)),
                            st.lists(st.integers(0, 5), max_size=3), st.integers(0, 2**16))

    @hypothesis.settings(max_examples=60, deadline=None)
    @hypothesis.given(specs=st.lists(tensor_spec, min_size=1, max_size=4),
                      data=st.data())
    def prop(specs, data):
        tensors = {f"t{i}": tensor_for(d, tuple(s), seed) for i, (d, s, seed) in enumerate(specs)}
        with tempfile.TemporaryDirectory() as tmp:
            path = os.path.join(tmp, "p.safetensors")
            with open(path, "wb") as f:
                f.write(save(tensors))
            with open_weights(path) as source:
                expected_bytes = 0
                for name, tensor in tensors.items():
                    n = tensor.shape[0] if tensor.dim() else 1
                    start = data.draw(st.integers(0, n))
                    stop = data.draw(st.integers(start, n))
                    if not tensor.dim():
                        start, stop = 0, 1
                    rows = source.read_rows(name, start, stop)
                    want = tensor[start:stop] if tensor.dim() else tensor
                    assert same_bits(rows, want)
                    expected_bytes += want.numel() * want.element_size()
                assert source.bytes_read == expected_bytes

    prop()
