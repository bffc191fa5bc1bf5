"""Held-out evaluation of one rank's share (collective over the group).

The eval set is split by ``eval_micro_batches`` (a pure function of samples, rank and world
size): every sample is evaluated once, and the sample-weighted loss is the same at any world
size. Runs in ``model.eval()`` under ``torch.no_grad()`` and puts the model back in train mode.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from elastic_ckpt.data import eval_micro_batches, forward_passes
from elastic_ckpt.train.accumulate import WeightedSums, agree_on_names, split_loss
from elastic_ckpt.train.batch import count_tokens, load_batch
from elastic_ckpt.train.job import EvalMetrics, LossFn


def evaluate(model: nn.Module, dataset: Any, eval_fn: LossFn,
             collate_fn: Callable[[list], Any], *, step: int, num_samples: int,
             micro_batch_size: int, device: torch.device) -> EvalMetrics:
    """Evaluate the first ``num_samples`` samples of ``dataset`` after ``step`` steps.
    Collective: every rank runs the same number of forward passes (a rank with fewer samples
    runs zero-weight ones, as FSDP gathers parameters in each)."""
    t0 = time.perf_counter()
    rank, world_size = dist.get_rank(), dist.get_world_size()
    batches = eval_micro_batches(num_samples, rank, world_size, micro_batch_size)
    passes = forward_passes(num_samples, world_size, micro_batch_size)
    sums = WeightedSums(device)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for i in range(passes):
                ids, weight = (batches[i], len(batches[i])) if i < len(batches) else (range(1), 0)
                batch = load_batch(dataset, ids, collate_fn, device)
                loss, metrics = split_loss(eval_fn(model, batch), "eval_fn")
                sums.add(loss, metrics, weight, count_tokens(batch) if weight else 0)
    finally:
        model.train(was_training)
    agree_on_names(list(sums.metrics or {}), "eval_fn")
    stats, work = sums.start_reduce([])
    work.wait()
    loss, metrics, samples, _, _ = sums.finish(stats)
    return EvalMetrics(step=step, loss=loss, metrics=metrics, samples=samples,
                       world_size=world_size, eval_time_s=time.perf_counter() - t0)
