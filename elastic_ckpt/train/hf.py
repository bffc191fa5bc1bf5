"""Hugging Face causal LMs as a built-in model kind (``model: {kind: hf, ...}``).

``transformers`` is an optional dependency (``pip install elastic_ckpt[hf]``), imported only
when an HF model is asked for. Nothing is downloaded: the architecture comes from config fields
or a directory's ``config.json``; weights come from ``checkpoint.init_from``.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from elastic_ckpt.config import HFModelConfig
from elastic_ckpt.errors import ConfigError
from elastic_ckpt.storage import Storage


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError("model.kind 'hf' needs transformers: pip install 'elastic_ckpt[hf]'",
                          field="model.kind") from None
    return transformers


def hf_config(cfg: HFModelConfig) -> Any:
    """The ``PretrainedConfig`` named by ``cfg`` (config fields, or ``path``'s config.json)."""
    transformers = _transformers()
    fields = dict(cfg.config) if cfg.config is not None else _read_config_json(cfg.path)
    model_type = fields.pop("model_type", None)
    try:
        return transformers.AutoConfig.for_model(model_type, **fields)
    except (ValueError, KeyError) as exc:
        where = "model.config" if cfg.config is not None else f"{cfg.path}/config.json"
        raise ConfigError(f"{where}: cannot build an HF config of model_type {model_type!r}: "
                          f"{exc}", field="model.config") from None


def _read_config_json(path: str) -> dict[str, Any]:
    storage = Storage(path)
    try:
        text = storage.read_bytes("config.json")
    except Exception as exc:  # noqa: BLE001 - any storage failure: say which file
        raise ConfigError(f"model.path: cannot read {storage.uri_of('config.json')}: {exc}",
                          field="model.path") from None
    fields = json.loads(text)
    if not isinstance(fields, dict) or "model_type" not in fields:
        raise ConfigError(f"{storage.uri_of('config.json')} has no model_type; is it an HF "
                          "model directory?", field="model.path")
    return fields


def build_hf_causal_lm(cfg: HFModelConfig) -> nn.Module:
    """``AutoModelForCausalLM.from_config`` with parameters on the meta device (buffers such
    as rotary frequencies stay real): the trainer shards it, then materializes each rank's
    shards one FSDP unit at a time."""
    transformers = _transformers()
    config = hf_config(cfg)
    with meta_parameters():
        model = transformers.AutoModelForCausalLM.from_config(
            config, attn_implementation=cfg.attn_implementation)
    # A saved config.json usually says torch_dtype bfloat16, and from_config honours it:
    # train on fp32 master weights instead (``mixed_precision: bf16`` computes in bf16).
    return model.to(torch.float32)


@contextlib.contextmanager
def meta_parameters() -> Iterator[None]:
    """Modules constructed inside get their parameters on the meta device; buffers are
    computed for real (so a buffer made in ``__init__`` needs no init code later)."""
    register = nn.Module.register_parameter

    def on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and not param.is_meta:
            module._parameters[name] = nn.Parameter(param.to("meta"),
                                                    requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def hf_lm_loss(model: nn.Module, batch: Any) -> torch.Tensor:
    """Mean next-token cross-entropy of an HF causal LM over the micro-batch (every position
    but the last), the same loss as ``lm_loss`` for the built-in GPT."""
    ids = batch["input_ids"] if isinstance(batch, dict) else batch
    logits = model(input_ids=ids[:, :-1], use_cache=False).logits
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(),
                           ids[:, 1:].reshape(-1))
