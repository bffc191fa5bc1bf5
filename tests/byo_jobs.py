"""Bring-your-own-model pieces shared by the tests: a tiny HF Llama config, user builders
(param groups, OneCycleLR, SGD), a tuple dataset, a loss with metrics. Module level, so they
pickle into spawned ranks and Ray workers."""

from __future__ import annotations

import functools
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from elastic_ckpt.config import TrainConfig
from train_jobs import tiny_config

LLAMA = {"model_type": "llama", "vocab_size": 64, "hidden_size": 32, "intermediate_size": 64,
         "num_hidden_layers": 2, "num_attention_heads": 2, "num_key_value_heads": 2,
         "max_position_embeddings": 32}
"""A tiny Llama (untied head): two decoder layers."""


def hf_config(uri: str, llama: dict | None = None, **kw: Any) -> TrainConfig:
    """``tiny_config`` with ``model: {kind: hf, config: LLAMA}``."""
    base = tiny_config(uri, **kw)
    raw = base.model_dump(mode="json")
    raw["model"] = {"kind": "hf", "config": dict(llama or LLAMA)}
    return TrainConfig.model_validate(raw)


def llama(llama_fields: dict | None = None, *, seed: int | None = None, meta: bool = False):
    """A plain (unsharded) ``LlamaForCausalLM``; ``meta``: fully on the meta device, buffers
    included (the case where init code must recompute the rotary buffers)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    fields = dict(llama_fields or LLAMA)
    config = AutoConfig.for_model(fields.pop("model_type"), **fields)
    if seed is not None:
        torch.manual_seed(seed)
    if meta:
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")
    return AutoModelForCausalLM.from_config(config, attn_implementation="sdpa")


# -- optimizers and schedules ------------------------------------------------------------------
def no_decay(name: str, param: torch.Tensor) -> bool:
    return param.ndim < 2 or name.endswith(".bias") or "norm" in name


def adamw_two_groups(model: nn.Module, lr: float = 3e-3) -> torch.optim.Optimizer:
    """Weight decay on matrices only; the no-decay group at half the lr."""
    decay = [p for n, p in model.named_parameters() if not no_decay(n, p)]
    rest = [p for n, p in model.named_parameters() if no_decay(n, p)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.1},
                              {"params": rest, "weight_decay": 0.0, "lr": lr / 2}],
                             lr=lr, betas=(0.9, 0.95))


def sgd_momentum(model: nn.Module, lr: float = 0.05) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9)


def frozen_sgd(model: nn.Module) -> torch.optim.Optimizer:
    """lr 0: the weights stay what they were, so an eval sees the initial model."""
    return torch.optim.SGD(model.parameters(), lr=0.0)


def one_cycle(optimizer: torch.optim.Optimizer, total_steps: int):
    max_lr = [g["lr"] for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=max_lr,
                                               total_steps=total_steps, pct_start=0.3)


def step_lr(optimizer: torch.optim.Optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=3, gamma=0.5)


# -- a loss with metrics -----------------------------------------------------------------------
def lm_loss_with_metrics(model: nn.Module, batch: Any):
    """Next-token loss plus ``accuracy`` and ``first_logit`` (means over the micro-batch's
    samples, so their global-batch mean is the mean over every sample)."""
    ids = batch["input_ids"]
    out = model(input_ids=ids[:, :-1], use_cache=False) if hasattr(model, "config") else \
        model(ids[:, :-1])
    logits = out.logits if hasattr(out, "logits") else out
    loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), ids[:, 1:].reshape(-1))
    accuracy = (logits.argmax(-1) == ids[:, 1:]).float().mean()
    return loss, {"accuracy": accuracy, "first_logit": logits[:, 0, 0].float().mean()}


def per_sample_metrics(model: nn.Module, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """Offline: loss, accuracy and first_logit of every sample (one row each)."""
    with torch.no_grad():
        out = model(ids[:, :-1])
        logits = out.logits if hasattr(out, "logits") else out
        loss = F.cross_entropy(logits.transpose(1, 2).float(), ids[:, 1:],
                               reduction="none").mean(1)
        acc = (logits.argmax(-1) == ids[:, 1:]).float().mean(1)
    return {"loss": loss.double(), "accuracy": acc.double(),
            "first_logit": logits[:, 0, 0].double()}


# -- a tuple dataset ---------------------------------------------------------------------------
class PairDataset:
    """``(x, y)`` tuples, the most common PyTorch pattern: y = x @ w + noise."""

    def __init__(self, n: int = 60, dim: int = 8) -> None:
        g = torch.Generator().manual_seed(7)
        self.x = torch.randn(n, dim, generator=g)
        w = torch.randn(dim, 1, generator=g)
        self.y = self.x @ w + 0.01 * torch.randn(n, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class MLP(nn.Module):
    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.layers = nn.ModuleList([nn.Linear(dim, 16), nn.Linear(16, 16), nn.Linear(16, 1)])

    def forward(self, x):
        for i, layer in enumerate(self.layers):
            x = layer(x) if i == len(self.layers) - 1 else F.relu(layer(x))
        return x


def mse_loss(model: nn.Module, batch) -> torch.Tensor:
    x, y = batch
    return F.mse_loss(model(x), y)


def partial(fn, *args, **kwargs):
    return functools.partial(fn, *args, **kwargs)
