"""Sample-weighted sums of the loss and the user's metrics over micro-batches, reduced over
the group in one ``all_reduce``: every mean is over the global batch (or the eval set),
whatever the world size and however the samples fell into micro-batches."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from elastic_ckpt.errors import ConfigError


def split_loss(out: Any, where: str = "loss_fn") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """``loss_fn``'s result as ``(loss, metrics)``: a 0-dim tensor, or ``(loss, {name: t})``."""
    metrics: Any = {}
    if isinstance(out, (tuple, list)):
        if len(out) != 2 or not isinstance(out[1], dict):
            raise ConfigError(f"{where} must return a loss tensor or (loss, {{name: tensor}}), "
                              f"got a {type(out).__name__} of {len(out)}", field=where)
        out, metrics = out
    if not isinstance(out, torch.Tensor) or out.numel() != 1:
        raise ConfigError(f"{where} must return a 0-dim loss tensor, got "
                          f"{type(out).__name__}{tuple(getattr(out, 'shape', ()))}", field=where)
    for name, value in metrics.items():
        if not isinstance(value, (torch.Tensor, float, int)) or torch.as_tensor(value).numel() != 1:
            raise ConfigError(f"{where}: metric {name!r} must be a 0-dim tensor or a number",
                              field=where)
    return out, metrics


class WeightedSums:
    """Accumulates ``value * samples`` per name in float64 on ``device``; ``reduce`` sums
    across ranks (collective) and returns means. The metric names come from the first
    micro-batch; every micro-batch, on every rank, must return the same names."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss = torch.zeros((), dtype=torch.float64, device=device)
        self.metrics: dict[str, torch.Tensor] | None = None
        self.samples = 0
        self.tokens = 0

    def add(self, loss: torch.Tensor, metrics: dict[str, Any], samples: int,
            tokens: int = 0) -> None:
        if self.metrics is None:
            self.metrics = {k: torch.zeros((), dtype=torch.float64, device=self.device)
                            for k in sorted(metrics)}
        elif sorted(metrics) != list(self.metrics):
            raise ConfigError(f"loss_fn returned metrics {sorted(metrics)} for one micro-batch "
                              f"and {list(self.metrics)} for another; return the same names "
                              "every time", field="loss_fn")
        if not samples:  # a zero-weight filler pass: only the names count
            return
        self.loss += loss.detach().double() * samples
        for name, value in metrics.items():
            self.metrics[name] += torch.as_tensor(value).detach().to(
                self.device, torch.float64).reshape(()) * samples
        self.samples += samples
        self.tokens += tokens

    def start_reduce(self, extras: list[float]) -> tuple[torch.Tensor, Any]:
        """Launch the all-reduce of [loss, samples, tokens, *metrics, *extras] (async);
        ``finish`` reads it once the work is waited on."""
        names = list(self.metrics or {})
        parts = [self.loss, *(self.metrics[n] for n in names)]
        scalars = torch.tensor([float(self.samples), float(self.tokens), *extras],
                               dtype=torch.float64, device=self.device)
        stats = torch.cat([torch.stack(parts), scalars])
        return stats, dist.all_reduce(stats, async_op=True)

    def finish(self, stats: torch.Tensor) -> tuple[float, dict[str, float], int, int, list[float]]:
        """``(mean loss, mean metrics, samples, tokens, summed extras)`` after the reduce."""
        names = list(self.metrics or {})
        values = stats.tolist()
        n = len(names)
        loss_sum, metric_sums = values[0], values[1:1 + n]
        samples, tokens, extras = values[1 + n], values[2 + n], values[3 + n:]
        denom = max(samples, 1.0)
        return (loss_sum / denom, {k: v / denom for k, v in zip(names, metric_sums)},
                int(samples), int(tokens), extras)


def agree_on_names(names: list[str], where: str) -> None:
    """Collective: every rank must report the same metric names (else the reduce would mix
    them up or hang); raises ``ConfigError`` on every rank naming the difference."""
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, sorted(names))
    if any(g != gathered[0] for g in gathered):
        raise ConfigError(f"{where} returned different metric names on different ranks: "
                          + "; ".join(f"rank {r}: {g}" for r, g in enumerate(gathered)),
                          field=where)
