"""``elastic-ckpt export --format hf``: a Hugging Face model directory that
``AutoModelForCausalLM.from_pretrained`` loads as is, from a 2-rank FSDP2 checkpoint."""

from __future__ import annotations

import json
import os
import warnings

import pytest
import torch
from safetensors import safe_open

from elastic_ckpt.checkpoint.catalog import open_checkpoint
from elastic_ckpt.checkpoint.export_hf import (
    ModelRecord,
    export_hf,
    parse_size,
    plan_shards,
    read_model_record,
    model_class_name,
    shard_filenames,
    untie,
)
from elastic_ckpt.checkpoint.manager import CheckpointManager
from elastic_ckpt.cli.main import main
from elastic_ckpt.errors import CheckpointCorruptError, CheckpointError
from elastic_ckpt.storage import Storage

PROBE = torch.tensor([[1, 5, 9, 2, 33, 7, 60, 4], [3, 3, 8, 21, 0, 63, 12, 40]])
TIED = ["model.embed_tokens.weight", "lm_head.weight"]


def tiny_config():
    from transformers import LlamaConfig

    return LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32,
                       tie_word_embeddings=True)


def tied_groups(model: torch.nn.Module) -> list[list[str]]:
    """State-dict names sharing one Parameter, by identity, in registration order."""
    by_param: dict[int, list[str]] = {}
    for name, param in model.named_parameters(remove_duplicate=False):
        by_param.setdefault(id(param), []).append(name)
    return [names for names in by_param.values() if len(names) > 1]


def _train_and_save(rank: int, world_size: int, root: str):
    """Two optimizer steps of a tied tiny Llama under FSDP2, then step 2 saved with the full
    model record and step 3 with no config. Rank 0 returns the trained full parameters and
    the logits of ``PROBE``."""
    from transformers import LlamaForCausalLM

    from elastic_ckpt.checkpoint.app_state import AppState
    from elastic_ckpt.train import default_parallelize, device_mesh

    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_config())
    model_class = type(model).__name__  # before fully_shard renames it FSDPLlamaForCausalLM
    default_parallelize(model, device_mesh(torch.device("cpu")))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(100 + rank)
    for _ in range(2):
        ids = torch.randint(0, 64, (2, 16), generator=g)
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    record = {"class": model_class, "config": model.config.to_dict(),
              "tied": tied_groups(model)}
    manager = CheckpointManager(root, keep_last=None)
    manager.save(2, {"app": AppState(model, optimizer), "model": record})
    manager.save(3, {"app": AppState(model, optimizer), "model": {**record, "config": None}})
    full = {name: p.full_tensor() for name, p in model.named_parameters()}
    # Last: the root FSDP unit stays unsharded after a forward outside backward.
    with torch.no_grad():
        logits = model(input_ids=PROBE).logits
    return (full, logits, record["tied"]) if rank == 0 else None


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """``(checkpoint root, full parameters, logits, tied groups)`` of one 2-rank run."""
    from elastic_ckpt.train.local import run_ranks

    root = str(tmp_path_factory.mktemp("hf") / "ckpts")
    full, logits, tied = run_ranks(2, _train_and_save, root)[0]
    return root, full, logits, tied


def ckpt(root: str, step: int) -> str:
    return os.path.join(root, f"step-{step:08d}")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def load_hf(path):
    from transformers import AutoModelForCausalLM

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return AutoModelForCausalLM.from_pretrained(str(path))


def assert_same_model(path, full, logits) -> None:
    model = load_hf(path)
    assert model.lm_head.weight is model.model.embed_tokens.weight  # re-tied by the loader
    sd = model.state_dict()
    for name, tensor in full.items():
        assert torch.equal(sd[name], tensor), name
    with torch.no_grad():
        got = model(input_ids=PROBE).logits
    torch.testing.assert_close(got, logits, atol=1e-6, rtol=0)


# -- end to end, through the CLI -----------------------------------------------------------------
@pytest.mark.dist
def test_hf_export_loads_with_from_pretrained(trained, tmp_path, capsys):
    from transformers import LlamaForCausalLM

    root, full, logits, tied = trained
    assert tied == [TIED]
    out = tmp_path / "hf"
    code, text, _ = run(capsys, "export", ckpt(root, 2), out, "--format", "hf")
    assert code == 0, text
    assert "(hf: model.safetensors, config.json)" in text
    assert "lm_head.weight not written (tied to model.embed_tokens.weight)" in text
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors"]
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert f.metadata()["format"] == "pt"
        assert set(f.keys()) == set(full)  # model keys only, lm_head written once (as embed)
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == ["LlamaForCausalLM"] and config["tie_word_embeddings"]
    torch.manual_seed(0)
    init = LlamaForCausalLM(tiny_config()).model.embed_tokens.weight
    assert not torch.allclose(init, full["model.embed_tokens.weight"])  # it trained
    assert_same_model(out, full, logits)


@pytest.mark.dist
def test_hf_export_sharded_with_index(trained, tmp_path, capsys):
    root, full, logits, _ = trained
    out = tmp_path / "hf"
    code, text, _ = run(capsys, "export", ckpt(root, 2), out, "--format", "hf",
                        "--max-shard-size", "20KB", "--json")
    assert code == 0
    result = json.loads(text)
    shards = [f for f in result["files"] if f.endswith(".safetensors")]
    assert len(shards) > 1 and shards == shard_filenames(len(shards))
    assert result["files"][-2:] == ["model.safetensors.index.json", "config.json"]
    assert result["tied_dropped"] == {"lm_head.weight": "model.embed_tokens.weight"}
    assert result["config_written"] is True and result["notes"] == []
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(full) and set(index["weight_map"].values()) == set(
        shards)
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in full.values())
    for shard in shards:
        assert os.path.getsize(out / shard) < 20_000 + 4096  # data <= 20 kB, plus the header
    assert_same_model(out, full, logits)


@pytest.mark.dist
def test_hf_export_without_recorded_config(trained, tmp_path, capsys):
    root, full, logits, _ = trained
    out = tmp_path / "hf"
    code, text, _ = run(capsys, "export", ckpt(root, 3), out, "--format", "hf")
    assert code == 0
    assert "note: the checkpoint records no model config" in text
    assert "no config.json: from_pretrained needs one" in text
    assert os.listdir(out) == ["model.safetensors"]
    # Doing what the note says makes it loadable.
    tiny_config().save_pretrained(str(out))
    assert_same_model(out, full, logits)


@pytest.mark.dist
def test_hf_export_refuses_non_empty_output_unless_overwrite(trained, tmp_path, capsys):
    root, _, _, _ = trained
    out = tmp_path / "hf"
    out.mkdir()
    (out / "tokenizer.json").write_text("{}")
    code, _, err = run(capsys, "export", ckpt(root, 2), out, "--format", "hf")
    assert code == 1 and "is not empty (tokenizer.json)" in err and "--overwrite" in err
    assert os.listdir(out) == ["tokenizer.json"]
    # A sharded export, then a single-file one over it: no stale shard or index is left.
    assert run(capsys, "export", ckpt(root, 2), out, "--format", "hf", "--overwrite",
               "--max-shard-size", "20000")[0] == 0
    assert run(capsys, "export", ckpt(root, 2), out, "--format", "hf", "--overwrite")[0] == 0
    assert sorted(os.listdir(out)) == ["config.json", "model.safetensors", "tokenizer.json"]
    file = tmp_path / "a-file"
    file.write_text("")
    code, _, err = run(capsys, "export", ckpt(root, 2), file, "--format", "hf")
    assert code == 1 and "is a file" in err


@pytest.mark.dist
def test_hf_export_prefix_override(trained, tmp_path):
    root, full, _, _ = trained
    out = tmp_path / "hf"
    report = export_hf(ckpt(root, 2), str(out), prefix="app.model.model")
    # Names are relative to the prefix now, so the recorded tied names no longer match.
    assert report.tied_dropped == {} and report.num_tensors == len(full)
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        assert "embed_tokens.weight" in set(f.keys())


def test_hf_export_cli_usage_errors(capsys, tmp_path):
    code, _, err = run(capsys, "export", tmp_path, tmp_path / "m.pt", "--max-shard-size", "1GB")
    assert code == 2 and "--max-shard-size applies to --format hf only" in err
    code, _, err = run(capsys, "export", tmp_path, tmp_path / "o", "--format", "hf",
                       "--max-shard-size", "lots")
    assert code == 2 and "e.g. 5GB, 500MB, 2GiB" in err
    code, _, err = run(capsys, "export", tmp_path, tmp_path / "o")
    assert code == 2 and "--format {safetensors,torch,hf}" in err


# -- pieces ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("size", "expected"), [
    ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("2GiB", 2 * 2**30), ("10kib", 10 * 2**10),
    ("1.5MB", 1_500_000), ("123", 123), (4096, 4096), (" 7 B ", 7),
])
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["", "GB", "5XB", "-1GB", "0", 0, "1e9"])
def test_parse_size_rejects(size):
    with pytest.raises(ValueError, match="size"):
        parse_size(size)


def test_plan_shards_fills_in_order_and_isolates_big_tensors():
    sizes = {"a": 4, "b": 4, "c": 3, "big": 20, "d": 1, "e": 9}
    assert plan_shards(sizes, 10) == [["a", "b"], ["c"], ["big"], ["d", "e"]]
    assert plan_shards(sizes, 100) == [list(sizes)]
    assert shard_filenames(1) == ["model.safetensors"]
    assert shard_filenames(2) == ["model-00001-of-00002.safetensors",
                                  "model-00002-of-00002.safetensors"]


def test_model_class_name_undoes_fsdp2_class_swap():
    assert model_class_name("FSDPLlamaForCausalLM") == "LlamaForCausalLM"
    assert model_class_name("LlamaForCausalLM") == "LlamaForCausalLM"
    assert model_class_name("FSDP") == "FSDP"


def save_single(root, state: dict) -> str:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # DCP: "assuming single process"
        return CheckpointManager(str(root), keep_last=None).save(1, state).uri


def test_untie_keeps_the_first_name_or_writes_another_under_it(tmp_path):
    w = torch.randn(4, 2)
    uri = save_single(tmp_path / "c", {"m": {"emb": w, "head": w.clone(), "other": w.clone(),
                                             "x": torch.ones(3)}})
    _, manifest = open_checkpoint(Storage(uri))
    names = {"emb": "m.emb", "head": "m.head", "x": "m.x"}
    kept, dropped = untie(names, (("emb", "head"),), manifest)
    assert kept == {"emb": "m.emb", "x": "m.x"} and dropped == {"head": "emb"}
    # A checkpoint that stored the shared tensor only under a later name of the group.
    kept, dropped = untie({"head": "m.head", "x": "m.x"}, (("emb", "head"),), manifest)
    assert kept == {"emb": "m.head", "x": "m.x"} and dropped == {"head": "emb"}
    assert untie(names, (("nope", "nada"),), manifest) == (names, {})
    with pytest.raises(CheckpointError, match=r"ties 'x' to 'emb'.*float32\[3\]"):
        untie(names, (("emb", "x"),), manifest)


def test_model_record_absent_or_malformed(tmp_path):
    uri = save_single(tmp_path / "a", {"m": {"w": torch.ones(2)}})
    assert read_model_record(open_checkpoint(Storage(uri))[1]) == ModelRecord()
    for i, bad in enumerate(["gpt2", {"tied": "lm_head.weight"}, {"config": [1]},
                             {"class": 3}]):
        uri = save_single(tmp_path / f"b{i}", {"m": {"w": torch.ones(2)}, "model": bad})
        with pytest.raises(CheckpointError, match="--format safetensors"):
            read_model_record(open_checkpoint(Storage(uri))[1])


def test_hf_export_without_record_keeps_every_tensor(tmp_path):
    w = torch.randn(4, 2)
    uri = save_single(tmp_path / "c", {"app": {"model": {"emb": w, "head": w.clone()}},
                                       "other": {"t": torch.ones(1)}})
    report = export_hf(uri, str(tmp_path / "hf"))
    assert report.num_tensors == 2 and report.tied_dropped == {} and report.num_skipped_tensors == 1
    assert report.files == ("model.safetensors",) and not report.config_written
    assert "config.json" in report.notes[0]


def test_hf_export_failure_leaves_no_files(tmp_path):
    state = {"app": {"model": {f"w{i}": torch.randn(8, 8) for i in range(4)}}}
    uri = save_single(tmp_path / "c", state)
    _, manifest = open_checkpoint(Storage(uri))
    chunk = manifest.tensors["app.model.w3"].chunks[0]  # in the last shard
    path = os.path.join(uri, chunk.file)
    data = bytearray(open(path, "rb").read())
    data[chunk.byte_offset + 5] ^= 0x04
    open(path, "wb").write(bytes(data))
    out = tmp_path / "hf"
    with pytest.raises(CheckpointCorruptError, match=r"app\.model\.w3"):
        export_hf(uri, str(out), max_shard_size=8 * 8 * 4)
    assert os.listdir(out) == []
