"""``AppState``: a DCP ``Stateful`` over an FSDP2 model, its optimizer and LR scheduler.

State dicts stay sharded (DTensor shards per rank, no gather to one rank); DCP's
``get_state_dict`` / ``set_state_dict`` handle FSDP2 parameter names and optimizer state
layout, so a checkpoint saved at one world size loads into a model sharded at any other.
"""

from __future__ import annotations

from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_state_dict,
    set_model_state_dict,
    set_state_dict,
)
from torch.distributed.checkpoint.stateful import Stateful


class AppState(Stateful):
    """Checkpointable view of ``model`` (+ ``optimizer``, + ``scheduler``).

    ``state_dict()`` and ``load_state_dict()`` are called by DCP on every rank; they are local
    (no collectives beyond what ``get_state_dict`` does to initialize empty optimizer state).
    """

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                 scheduler: Any | None = None) -> None:
        self.model = model
        self.optimizer = optimizer
        self.scheduler = scheduler
        self._options = StateDictOptions(full_state_dict=False, cpu_offload=False)

    def state_dict(self) -> dict[str, Any]:
        if self.optimizer is None:
            state = {"model": get_model_state_dict(self.model, options=self._options)}
        else:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer,
                                                options=self._options)
            state = {"model": model_sd, "optim": optim_sd}
        if self.scheduler is not None:
            state["scheduler"] = self.scheduler.state_dict()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if self.optimizer is None:
            set_model_state_dict(self.model, state_dict["model"], options=self._options)
        else:
            set_state_dict(self.model, self.optimizer, model_state_dict=state_dict["model"],
                           optim_state_dict=state_dict["optim"], options=self._options)
        if self.scheduler is not None:
            self.scheduler.load_state_dict(state_dict["scheduler"])
