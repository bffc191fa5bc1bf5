"""``shard_units`` finds the transformer blocks anywhere in the tree (HF Llama, GPT-2, BERT, the
built-in GPT); ``default_parallelize`` makes each its own FSDP unit and warns when there are
none."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn as nn

from elastic_ckpt.config import ModelConfig
from elastic_ckpt.train import build_gpt, default_parallelize, device_mesh, fsdp_units, shard_units
from elastic_ckpt.train.local import run_ranks

transformers = pytest.importorskip("transformers")
TINY = dict(vocab_size=64, max_position_embeddings=32)


def _llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2,
        **TINY))


def _gpt2():
    return transformers.GPT2LMHeadModel(transformers.GPT2Config(
        vocab_size=64, n_embd=32, n_layer=3, n_head=2, n_positions=32, bos_token_id=0,
        eos_token_id=0))


def _bert():
    return transformers.BertForMaskedLM(transformers.BertConfig(
        hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64,
        **TINY))


@pytest.mark.parametrize("build, blocks", [
    (_llama, lambda m: m.model.layers),
    (_gpt2, lambda m: m.transformer.h),
    (_bert, lambda m: m.bert.encoder.layer),
    (lambda: build_gpt(ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2,
                                   max_seq_len=16)), lambda m: m.blocks),
], ids=["llama", "gpt2", "bert", "gpt"])
def test_shard_units_are_the_blocks(build, blocks):
    model = build()
    units = shard_units(model)
    assert units == list(blocks(model)) and len(units) == 3


def test_without_no_split_modules_the_largest_same_class_module_list_wins():
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.heads = nn.ModuleList([nn.Linear(2, 2), nn.Linear(2, 2)])  # small
            self.trunk = nn.Sequential(nn.Linear(2, 8), nn.ModuleList(
                [nn.TransformerEncoderLayer(8, 2, 16) for _ in range(2)]))
            self.mixed = nn.ModuleList([nn.Linear(8, 64), nn.ReLU()])  # not same-class

    net = Net()
    assert shard_units(net) == list(net.trunk[1])
    assert shard_units(nn.Linear(2, 2)) == []


def _parallelize_plain(rank: int, world_size: int) -> tuple[list[str], list[str]]:
    logs: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: logs.append(record.getMessage())
    logging.getLogger("elastic_ckpt.train.parallelize").addHandler(handler)
    mesh = device_mesh(torch.device("cpu"))
    llama = default_parallelize(_llama(), mesh)
    plain = default_parallelize(nn.Sequential(nn.Linear(2, 2), nn.ReLU()), mesh)
    return fsdp_units(llama) + ["|"] + fsdp_units(plain), logs


@pytest.mark.dist
def test_default_parallelize_units_and_the_no_blocks_warning():
    units, logs = run_ranks(1, _parallelize_plain)[0]
    assert units == ["", "model.embed_tokens", "model.layers.0", "model.layers.1",
                     "model.layers.2", "lm_head", "|", ""]
    assert len(logs) == 1 and logs[0].startswith("Sequential: no transformer blocks found")
    assert "parallelize_fn" in logs[0]
