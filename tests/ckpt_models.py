"""A tiny FSDP2 model and the helpers the checkpoint tests share.

Everything here works with or without a process group: under
``elastic_ckpt.train.local.run_ranks`` the model is ``fully_shard``-ed per layer and at the root
on a 1-D CPU mesh; in a plain process it stays an ordinary module. Rank functions handed to
``run_ranks`` must be importable, so the ones used by more than one test file live here.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.checkpoint.stateful import Stateful
from torch.distributed.tensor import DTensor, Shard, distribute_tensor

# Sizes chosen so that no sharded dim divides evenly by 2, 3 or 4.
VOCAB, DIM, HIDDEN, OUT, BATCH = 37, 13, 29, 7, 11
SAVE_STEP = 3
"""Training steps taken before the reference save; the checkpoint is saved as this step."""
EXTRA = {"cursor": 17, "pair": (1, "two"), "nested": {"a": {"b": [1, (2, 3.5)]}, 4: "int key"},
         "inf": float("inf"), "none": None}


class ToyModel(nn.Module):
    def __init__(self, vocab: int = VOCAB) -> None:
        super().__init__()
        self.emb = nn.Embedding(vocab, DIM)
        self.l1 = nn.Linear(DIM, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN)
        self.l2 = nn.Linear(HIDDEN, OUT)
        self.register_buffer("seen", torch.zeros(5, dtype=torch.int64))

    def forward(self, ids: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        hidden = torch.relu(self.norm(self.l1(self.emb(ids))))
        return nn.functional.cross_entropy(self.l2(hidden), target)


def build(seed: int, lr: float = 1e-2,
          vocab: int = VOCAB) -> tuple[ToyModel, torch.optim.Optimizer]:
    """Model + AdamW; FSDP2-sharded over every rank when a process group is up."""
    torch.manual_seed(seed)
    model = ToyModel(vocab)
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        for layer in (model.emb, model.l1, model.norm, model.l2):
            fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01)
    return model, opt


def batch(step: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The global batch of ``step`` (every rank sees the same batch)."""
    g = torch.Generator().manual_seed(1000 + step)
    ids = torch.randint(0, VOCAB, (BATCH,), generator=g)
    return ids, torch.randint(0, OUT, (BATCH,), generator=g)


def train(model: ToyModel, opt: torch.optim.Optimizer, steps: range) -> list[torch.Tensor]:
    losses = []
    for step in steps:
        loss = model(*batch(step))
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            model.seen.add_(torch.arange(5) * (step + 1) + 2**40)
        losses.append(loss.detach().clone())
    return losses


def full(value: Any) -> Any:
    """A detached full copy: DTensors gathered (collective), containers walked in order."""
    if isinstance(value, DTensor):
        return value.full_tensor().detach().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: full(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(full(v) for v in value)
    return value


def full_state(model: nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Model and optimizer state keyed by parameter FQN, as full tensors. Collective."""
    model_sd, optim_sd = get_state_dict(model, opt, options=StateDictOptions())
    return {"model": full(model_sd), "optim": full(optim_sd)}


def assert_same(expected: Any, actual: Any, where: str = "state") -> None:
    """Bit-exact comparison of nested state: same keys, dtypes, shapes and bytes."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{where}: expected a tensor, got {actual!r}"
        assert (actual.dtype, actual.shape) == (expected.dtype, expected.shape), \
            f"{where}: {actual.dtype}{list(actual.shape)} != {expected.dtype}{list(expected.shape)}"
        assert torch.equal(actual, expected), f"{where}: values differ"
    elif isinstance(expected, dict):
        assert isinstance(actual, dict), f"{where}: expected a dict, got {actual!r}"
        assert sorted(map(str, actual)) == sorted(map(str, expected)), \
            f"{where}: keys {sorted(map(str, actual))} != {sorted(map(str, expected))}"
        for key in expected:
            assert_same(expected[key], actual[key], f"{where}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert type(actual) is type(expected) and len(actual) == len(expected), \
            f"{where}: {actual!r} != {expected!r}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same(e, a, f"{where}[{i}]")
    else:
        assert type(actual) is type(expected) and actual == expected, \
            f"{where}: {actual!r} != {expected!r}"


class TensorBag(Stateful):
    """A plain ``Stateful`` over a dict of tensors (loaded in place by DCP)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.tensors

    def load_state_dict(self, state_dict: dict[str, torch.Tensor]) -> None:
        for key, value in state_dict.items():
            if value is not self.tensors[key]:
                self.tensors[key].copy_(value)


def odd_tensors(fill: bool) -> TensorBag:
    """bf16 (sharded when a process group is up), 0-dim float64 and int64 tensors."""
    g = torch.Generator().manual_seed(7)
    bf16 = torch.randn(10, 3, generator=g).to(torch.bfloat16) if fill else \
        torch.zeros(10, 3, dtype=torch.bfloat16)
    tensors = {
        "bf16": bf16,
        "scalar": torch.tensor(math.pi if fill else 0.0, dtype=torch.float64),
        "count": torch.tensor(2**40 + 3 if fill else 0, dtype=torch.int64),
    }
    if dist.is_initialized():
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh("cpu", (dist.get_world_size(),))
        tensors["bf16"] = distribute_tensor(bf16, mesh, [Shard(0)])
    return TensorBag(tensors)


# -- rank functions ---------------------------------------------------------------------------
def save_reference(root: str, **manager_kw: Any) -> dict[str, Any]:
    """Train ``SAVE_STEP`` steps, save as step ``SAVE_STEP``, then take one more step. Returns
    the full state as saved, the odd tensors, the info, and the losses of the next steps.
    Collective when a process group is up."""
    from elastic_ckpt import AppState, CheckpointManager

    model, opt = build(seed=0)
    train(model, opt, range(SAVE_STEP))
    bag = odd_tensors(fill=True)
    expected = full_state(model, opt)
    odd = full(bag.tensors)
    info = CheckpointManager(root, **manager_kw).save(
        SAVE_STEP, {"app": AppState(model, opt), "odd": bag, "extra": EXTRA})
    return {"state": expected, "odd": odd, "info": info, **continue_training(model, opt)}


def save_state_at(mgr: Any, step: int) -> dict[str, Any]:
    """Train a model whose state depends on ``step`` one step, save it as ``step`` with
    ``mgr``; return the full state as saved. Collective when a process group is up."""
    from elastic_ckpt import AppState

    model, opt = build(seed=step)
    train(model, opt, range(step, step + 1))
    expected = full_state(model, opt)
    mgr.save(step, {"app": AppState(model, opt), "extra": {"step": step}})
    return expected


def load_fresh(root: str, step: int | None = None) -> dict[str, Any]:
    """Build a differently-initialized model whose optimizer already has (different) state and
    another lr, load checkpoint ``step`` (default latest) into it, and return what was loaded
    and the losses of the next steps. Collective when a process group is up."""
    from elastic_ckpt import AppState, CheckpointManager

    world_size = dist.get_world_size() if dist.is_initialized() else 1
    model, opt = build(seed=100 + world_size, lr=0.5)
    train(model, opt, range(50, 50 + world_size))
    bag = odd_tensors(fill=False)
    extra: dict = {"stale": True}
    info = CheckpointManager(root).load({"app": AppState(model, opt), "odd": bag,
                                         "extra": extra}, step=step)
    state, odd = full_state(model, opt), full(bag.tensors)
    return {"state": state, "odd": odd, "info": info, "extra": extra,
            **continue_training(model, opt)}


def continue_training(model: ToyModel, opt: torch.optim.Optimizer) -> dict[str, torch.Tensor]:
    """Loss of step ``SAVE_STEP`` (taken), then the forward loss of the step after it."""
    (next_loss,) = train(model, opt, range(SAVE_STEP, SAVE_STEP + 1))
    with torch.no_grad():
        later_loss = model(*batch(SAVE_STEP + 1))
    return {"next_loss": next_loss, "later_loss": later_loss.detach().clone()}
