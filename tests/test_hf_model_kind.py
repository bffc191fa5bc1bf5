"""``model: {kind: hf, ...}``: config fields or a directory's config.json, validated once;
parameters on meta, buffers real; the next-token loss is the built-in GPT's."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from elastic_ckpt.config import HFModelConfig, TrainConfig, load_config
from elastic_ckpt.errors import ConfigError
from elastic_ckpt.train import lm_loss

transformers = pytest.importorskip("transformers")
from byo_jobs import LLAMA, llama  # noqa: E402
from elastic_ckpt.train.hf import build_hf_causal_lm, hf_lm_loss  # noqa: E402


def test_config_fields_build_meta_params_and_real_buffers():
    model = build_hf_causal_lm(HFModelConfig(kind="hf", config=LLAMA))
    assert type(model).__name__ == "LlamaForCausalLM" and len(model.model.layers) == 2
    assert all(p.is_meta for p in model.parameters())
    inv_freq = model.model.rotary_emb.inv_freq
    assert not inv_freq.is_meta and torch.equal(inv_freq, llama().model.rotary_emb.inv_freq)


def test_path_reads_config_json(tmp_path):
    llama(seed=0).save_pretrained(tmp_path / "m")
    model = build_hf_causal_lm(HFModelConfig(kind="hf", path=str(tmp_path / "m")))
    assert model.config.hidden_size == LLAMA["hidden_size"]
    with pytest.raises(ConfigError, match=r"cannot read .*nowhere/config.json"):
        build_hf_causal_lm(HFModelConfig(kind="hf", path=str(tmp_path / "nowhere")))
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"hidden_size": 3}))
    with pytest.raises(ConfigError, match="no model_type"):
        build_hf_causal_lm(HFModelConfig(kind="hf", path=str(tmp_path / "bad")))


@pytest.mark.parametrize("model, message", [
    ({"kind": "hf"}, "set exactly one of model.config"),
    ({"kind": "hf", "config": LLAMA, "path": "/x"}, "set exactly one of model.config"),
    ({"kind": "hf", "config": {"hidden_size": 8}}, "model.config needs model_type"),
    ({"kind": "hf", "config": {**LLAMA, "vocab_size": 100}, "_dataset": True},
     r"data.dataset.vocab_size \(256\) must be <= model.config.vocab_size \(100\)"),
    ({"kind": "hf", "config": {**LLAMA, "vocab_size": 256, "max_position_embeddings": 16},
      "_dataset": True}, r"data.dataset.seq_len \(64\) must be <= model.config.max_position_embeddings \(16\)"),
    ({"kind": "bert"}, "model"),
])
def test_hf_config_errors(model, message):
    raw = {"model": {k: v for k, v in model.items() if k != "_dataset"}}
    if model.get("_dataset"):  # the synthetic dataset named in the config is checked
        raw["data"] = {"dataset": {"kind": "synthetic"}}
    with pytest.raises(Exception, match=message):
        TrainConfig.model_validate(raw)


def test_a_larger_hf_vocabulary_than_the_synthetic_default_is_fine():
    cfg = TrainConfig.model_validate({"model": {"kind": "hf", "config": {**LLAMA,
                                                                      "vocab_size": 32000}}})
    assert cfg.model.config["vocab_size"] == 32000


def test_a_saved_bf16_config_still_trains_fp32_master_weights():
    model = build_hf_causal_lm(HFModelConfig(kind="hf", config={**LLAMA,
                                                              "torch_dtype": "bfloat16"}))
    assert {p.dtype for p in model.parameters()} == {torch.float32}


def test_unknown_model_type_names_the_field():
    cfg = HFModelConfig(kind="hf", config={"model_type": "no-such-model"})
    with pytest.raises(ConfigError, match="model.config: cannot build an HF config"):
        build_hf_causal_lm(cfg)


def test_shipped_hf_configs_load():
    for name in ("hf_llama_tiny", "hf_llama_1b"):
        cfg = load_config(str(Path(__file__).resolve().parents[1] / "configs" / f"{name}.yaml"))
        assert cfg.model.kind == "hf" and cfg.eval.dataset is not None


class _Logits(torch.nn.Module):
    """An HF model called the built-in GPT's way: ids in, logits out."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=ids).logits


def test_hf_loss_is_the_next_token_loss():
    model = llama(seed=0)
    ids = torch.randint(0, 64, (3, 10), generator=torch.Generator().manual_seed(0))
    assert hf_lm_loss(model, {"input_ids": ids}).item() == pytest.approx(
        lm_loss(_Logits(model), {"input_ids": ids}).item(), rel=1e-6)


# -- load_pretrained on an unsharded model (not collective): prefixes and their errors ---------
def test_init_key_prefix_strips_a_prefix_and_a_wrong_one_says_so(tmp_path):
    from elastic_ckpt.train.pretrained import load_pretrained

    source = llama(seed=3)
    torch.save({f"module.{k}": v for k, v in source.state_dict().items()}, tmp_path / "w.pt")
    target = llama(seed=4)
    report = load_pretrained(target, str(tmp_path / "w.pt"), prefix="module.")
    assert report.tensors == len(source.state_dict())
    assert report.bytes_read == report.model_bytes  # one rank, unsharded: all of it
    for k, v in source.state_dict().items():
        assert torch.equal(target.state_dict()[k], v), k
    with pytest.raises(ConfigError, match="set checkpoint.init_key_prefix"):
        load_pretrained(target, str(tmp_path / "w.pt"))
    with pytest.raises(ConfigError, match="no key in the file starts with init_key_prefix "
                                          "'model.' .*the first keys are module.model"):
        load_pretrained(target, str(tmp_path / "w.pt"), prefix="model.")
