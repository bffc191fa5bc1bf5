"""The FSDP2 models the checkpoint benchmarks save (``checkpoint.py``, ``async_save.py``): their
sizes, how they are built and sharded, the one AdamW step that creates the optimizer state, and
walking the resulting state.

Two shapes (``--shape`` of ``checkpoint.py``):

* ``blocks`` (default): an ``Embedding`` and 3 residual blocks of ``Linear(h, f)`` +
  ``Linear(f, h)``, sized from a GB figure, every dim odd and not a multiple of 3 so shards are
  uneven at W=2, 3 and 4; ``fully_shard`` per block + root.
* ``linear8``: ``nn.Sequential`` of 8 x ``Linear(2048, 2048)`` with ReLUs between,
  ``fully_shard`` per Linear + root: a fixed ~0.40 GB of parameters + AdamW state (the
  independent model shape of issue 10: "8 x nn.Linear(2048, 2048), fully_shard per layer +
  root, AdamW after one step, 0.4 GB").
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from _common import GB

SHAPES = ("blocks", "linear8")
LINEAR8 = {"shape": "linear8", "width": 2048, "layers": 8}
STATE_BYTES_PER_PARAM = 12
"""fp32 parameter + AdamW's exp_avg and exp_avg_sq."""


def _odd_not3(n: int) -> int:
    """Smallest m >= n that is odd and not a multiple of 3 (so shards are uneven at W=2,3,4)."""
    n = max(n, 5)
    while n % 2 == 0 or n % 3 == 0:
        n += 1
    return n


def model_dims(gb: float, shape: str = "blocks") -> dict[str, Any]:
    """The model's sizes, with its ``shape``. ``blocks``: params + exp_avg + exp_avg_sq (fp32)
    ~= ``gb`` GB: 3 blocks of Linear(h, f) + Linear(f, h) with f ~ 2h, and an
    Embedding(v ~ 2h, h): ~14 h^2 params; all dims odd and not multiples of 3 (uneven shards
    at every W). ``linear8``: fixed, ``gb`` is not used."""
    if shape == "linear8":
        return dict(LINEAR8)
    if shape != "blocks":
        raise ValueError(f"unknown model shape {shape!r}; choose from {SHAPES}")
    params = gb * GB / STATE_BYTES_PER_PARAM
    h = _odd_not3(int(math.sqrt(params / 14)))
    ffn = _odd_not3(2 * h)
    return {"shape": "blocks", "hidden": h, "ffn": ffn, "vocab": _odd_not3(ffn + 6),
            "blocks": 3}


def state_gb(dims: dict[str, Any]) -> float:
    """GB of fp32 parameters + AdamW state of the model ``dims`` describes."""
    if dims["shape"] == "linear8":
        w = dims["width"]
        params = dims["layers"] * (w * w + w)
    else:
        h, f, v = dims["hidden"], dims["ffn"], dims["vocab"]
        params = v * h + dims["blocks"] * (h * f + f + f * h + h)
    return params * STATE_BYTES_PER_PARAM / GB


class Block(nn.Module):
    def __init__(self, hidden: int, ffn: int) -> None:
        super().__init__()
        self.up = nn.Linear(hidden, ffn)
        self.down = nn.Linear(ffn, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.relu(self.up(x)))


class Net(nn.Module):
    def __init__(self, hidden: int, ffn: int, vocab: int, blocks: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, hidden)
        self.blocks = nn.ModuleList(Block(hidden, ffn) for _ in range(blocks))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return x


def _linear8(width: int, layers: int) -> nn.Sequential:
    mods: list[nn.Module] = []
    for i in range(layers):
        mods += [nn.Linear(width, width)] + ([nn.ReLU()] if i < layers - 1 else [])
    return nn.Sequential(*mods)


def build(world_size: int, dims: dict[str, Any], seed: int):
    """FSDP2 model (meta init, ``fully_shard`` per block or per Linear + root, then each rank
    fills its own shard) and its AdamW."""
    mesh = init_device_mesh("cpu", (world_size,))
    sizes = {k: v for k, v in dims.items() if k != "shape"}
    with torch.device("meta"):
        model = _linear8(**sizes) if dims["shape"] == "linear8" else Net(**sizes)
    units = ([m for m in model if isinstance(m, nn.Linear)] if dims["shape"] == "linear8"
             else list(model.blocks))
    for unit in units:
        fully_shard(unit, mesh=mesh)
    fully_shard(model, mesh=mesh)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed * 1000 + dist.get_rank())
    with torch.no_grad():
        for name, p in model.named_parameters():
            local = p.to_local() if isinstance(p, DTensor) else p
            std = 1.0 if name.startswith("embed") else 1.0 / math.sqrt(p.shape[-1])
            local.normal_(0.0, std if p.dim() > 1 else 0.02, generator=gen)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=0.01)
    return model, optimizer


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer,
               dims: dict[str, Any], tokens: int = 16,
               before_step: Callable[[], Any] | None = None) -> None:
    """One forward/backward/AdamW step on a random batch of ``tokens`` per rank (rows of 8;
    ``linear8``: rows of ``width``) that also creates the optimizer state. ``before_step``
    runs between the backward and ``optimizer.step`` (an async save's staging fence)."""
    gen = torch.Generator().manual_seed(dist.get_rank())
    rows = max(1, tokens // 8)
    if dims["shape"] == "linear8":
        inputs = torch.randn(rows, dims["width"], generator=gen)
    else:
        inputs = torch.randint(0, dims["vocab"], (rows, 8), generator=gen)
    loss = model(inputs).pow(2).mean()
    loss.backward()
    if before_step is not None:
        before_step()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


# -- the state ----------------------------------------------------------------------------------
def flatten_state(value: Any, prefix: str = "", out: dict[str, Any] | None = None
                  ) -> dict[str, Any]:
    """Nested dicts/lists -> ``{"a.b.0": leaf}``."""
    out = {} if out is None else out
    if isinstance(value, dict):
        for k, v in value.items():
            flatten_state(v, f"{prefix}.{k}" if prefix else str(k), out)
    elif isinstance(value, (list, tuple)) and not isinstance(value, torch.Tensor):
        for i, v in enumerate(value):
            flatten_state(v, f"{prefix}.{i}", out)
    else:
        out[prefix] = value
    return out


def local_tensors(app) -> list[tuple[str, torch.Tensor]]:
    """``(fqn, tensor)`` of every tensor in ``app.state_dict()``: this rank's shard of a
    DTensor, the tensor itself otherwise."""
    return [(fqn, v.to_local() if isinstance(v, DTensor) else v)
            for fqn, v in flatten_state(app.state_dict()).items()
            if isinstance(v, torch.Tensor)]


def local_state_bytes(app) -> int:
    """Bytes of this rank's tensors in ``app.state_dict()`` (its shards of DTensors)."""
    return sum(t.nbytes for _, t in local_tensors(app))
