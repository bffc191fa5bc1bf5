"""One rank's life: build and shard the model, restore, run the step loop, checkpoint.

``RankTrainer.run()`` is collective over the default process group: every rank of the group
calls it with the same config. It decides nothing about scaling; the runtime above sets the
stop flag and restarts the group at another size.
"""

from __future__ import annotations

import base64
import dataclasses
import logging
import math
import time
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn as nn

from elastic_ckpt.checkpoint import AppState, CheckpointInfo, CheckpointManager
from elastic_ckpt.config import OptimConfig, TrainConfig
from elastic_ckpt.data import ElasticSampler, collate_lm, fetch
from elastic_ckpt.errors import CheckpointNotFoundError, ConfigError
from elastic_ckpt.train.distributed import apply_fsdp, device_mesh, materialize
from elastic_ckpt.train.schedule import lr_at

log = logging.getLogger(__name__)

LossFn = Callable[[nn.Module, Any], torch.Tensor]
"""``loss_fn(model, batch)`` -> mean loss over the micro-batch (a 0-dim tensor)."""


@dataclasses.dataclass(frozen=True)
class StepMetrics:
    """What one rank reports after each optimizer step (``step`` = steps completed)."""

    step: int
    loss: float
    """Mean loss over the global batch (identical on every rank)."""
    world_size: int
    samples: int
    tokens: int
    lr: float
    step_time_s: float
    rank: int
    sample_ids: tuple[int, ...]
    """The dataset indices this rank consumed in this step (the sample ledger)."""


@dataclasses.dataclass(frozen=True)
class RankHooks:
    """How the runtime talks to a rank. Hooks run on the training thread and must not block.

    ``should_stop`` is polled once per step; the group agrees (any rank asking stops all) and
    stops after that step with a checkpoint.
    """

    should_stop: Callable[[], bool] = lambda: False
    on_step: Callable[[StepMetrics], None] = lambda metrics: None
    on_event: Callable[[str, dict[str, Any]], None] = lambda name, fields: None


@dataclasses.dataclass(frozen=True)
class RankResult:
    final_step: int
    stopped: bool
    """True when the run ended early because a stop was requested."""
    checkpoint: CheckpointInfo | None
    """The last checkpoint this run committed or restored from."""
    restored_step: int | None


@dataclasses.dataclass(frozen=True)
class TrainJob:
    """What every rank needs to train; shipped to each rank process once (must pickle:
    module-level functions or ``functools.partial``, plain datasets)."""

    config: TrainConfig
    model_fn: Callable[[], nn.Module]
    dataset: Any
    loss_fn: LossFn
    collate_fn: Callable[[list], Any] | None = None

    def trainer(self, hooks: RankHooks, device: torch.device) -> "RankTrainer":
        return RankTrainer(self.config, self.model_fn, self.dataset, self.loss_fn,
                           self.collate_fn, hooks=hooks, device=device)


class RankTrainer:
    """Runs training for one rank of the default process group."""

    def __init__(self, config: TrainConfig, model_fn: Callable[[], nn.Module], dataset: Any,
                 loss_fn: LossFn, collate_fn: Callable[[list], Any] | None = None,
                 hooks: RankHooks = RankHooks(), device: torch.device | None = None) -> None:
        self.config = config
        self.model_fn = model_fn
        self.dataset = dataset
        self.loss_fn = loss_fn
        self.collate_fn = collate_fn or collate_lm
        self.hooks = hooks
        self.device = device or torch.device("cpu")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        data = config.data
        self.sampler = ElasticSampler(len(dataset), data.global_batch_size, data.seed,
                                      data.shuffle)
        ck = config.checkpoint
        self.ckpt = CheckpointManager(ck.uri, keep_last=ck.keep_last, keep_every=ck.keep_every)
        self.restore_warnings: list[str] = []

    # -- setup -------------------------------------------------------------------------------
    def _build(self) -> tuple[nn.Module, torch.optim.Optimizer]:
        torch.manual_seed(self.config.seed)  # same initial weights on every rank, any W
        model = self.model_fn()
        model = apply_fsdp(model, device_mesh(self.device), self.config.mixed_precision)
        materialize(model, self.device)
        o = self.config.optim
        optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas,
                                      weight_decay=o.weight_decay)
        return model, optimizer

    def _schedule_settings(self) -> dict[str, Any]:
        return {"max_steps": self.config.max_steps,
                "optim": self.config.optim.model_dump(mode="json")}

    def _schedule_changes(self, saved: dict[str, Any] | None, step: int) -> list[str]:
        """What differs from the run that wrote the checkpoint, in words (legitimate, e.g.
        more ``max_steps`` to train longer, but it bends the LR curve at the resume step)."""
        if not saved:
            return []
        now, saved_optim = self._schedule_settings(), saved.get("optim", {})
        changed = [f"optim.{k} {saved_optim.get(k)!r} -> {v!r}"
                   for k, v in now["optim"].items() if saved_optim.get(k) != v]
        if saved.get("max_steps") != now["max_steps"]:
            changed.insert(0, f"max_steps {saved.get('max_steps')} -> {now['max_steps']}")
        if not changed:
            return []
        try:
            before = lr_at(step, OptimConfig(**saved["optim"]), int(saved["max_steps"]))
        except Exception:  # noqa: BLE001 - an older or foreign record: report without the lr
            before = None
        after = lr_at(step, self.config.optim, self.config.max_steps)
        lr = (f"; the LR at step {step} is {after:.3g}" +
              (f" (the saved run's schedule gives {before:.3g})" if before is not None else ""))
        return [f"resuming from step {step} with a changed schedule: " + ", ".join(changed) + lr]

    def _data_fingerprint(self) -> dict[str, Any]:
        d = self.config.data
        return {"num_samples": len(self.dataset), "global_batch_size": d.global_batch_size,
                "seed": d.seed, "shuffle": d.shuffle}

    def _restore(self, state: dict[str, Any]) -> tuple[int, CheckpointInfo | None]:
        try:
            info = self.ckpt.load(state, fallback=self.config.checkpoint.fallback_on_corrupt)
        except CheckpointNotFoundError:
            return 0, None
        saved = info.extra.get("trainer", {})
        expected = self._data_fingerprint()
        if saved.get("data") != expected:
            raise ConfigError(
                f"checkpoint {info.uri} was written with data settings {saved.get('data')} but "
                f"this run has {expected}; resuming would change the sample order. Restore the "
                "original data settings or start from a fresh checkpoint.uri.",
                field="data")
        step = int(saved["step"])
        if saved["samples_seen"] != step * expected["global_batch_size"]:
            raise ConfigError(f"checkpoint {info.uri}: samples_seen {saved['samples_seen']} "
                              f"does not match step {step}; the checkpoint is inconsistent")
        torch.set_rng_state(_decode_rng(saved["rng"]))
        self.restore_warnings = self._schedule_changes(saved.get("schedule"), step)
        for warning in self.restore_warnings if self.rank == 0 else ():
            log.warning("%s", warning)
        return step, info

    def _trainer_state(self, step: int, tokens_seen: int) -> dict[str, Any]:
        return {"step": step, "samples_seen": step * self.config.data.global_batch_size,
                "tokens_seen": tokens_seen, "world_size": self.world_size,
                "data": self._data_fingerprint(), "schedule": self._schedule_settings(),
                "rng": _encode_rng(torch.get_rng_state())}

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> RankResult:
        started = time.perf_counter()
        model, optimizer = self._build()
        app = AppState(model, optimizer)
        trainer_state: dict[str, Any] = {}
        t0 = time.perf_counter()
        step, info = self._restore({"app": app, "trainer": trainer_state})
        restored = None if info is None else step
        self.hooks.on_event("restore", {
            "seconds": time.perf_counter() - t0, "step": step,
            "from_world_size": None if info is None else info.world_size,
            "build_seconds": t0 - started,
            "skipped": [{"step": s, "error": e} for s, e in self.ckpt.last_skipped],
            "warnings": list(self.restore_warnings)})
        tokens_seen = int(trainer_state.get("tokens_seen", 0))
        stopped = False
        while step < self.config.max_steps:
            metrics, stop = self._train_step(model, optimizer, step)
            step += 1
            tokens_seen += metrics.tokens
            if step == (restored or 0) + 1:
                self.hooks.on_event("first_step", {"seconds": metrics.step_time_s,
                                                   "since_start_s": time.perf_counter() - started,
                                                   "step": step})
            self.hooks.on_step(metrics)
            if stop or self._due(step):
                info = self._save(app, step, tokens_seen)
            if stop:
                stopped = step < self.config.max_steps
                break
        return RankResult(final_step=step, stopped=stopped, checkpoint=info,
                          restored_step=restored)

    def _due(self, step: int) -> bool:
        ck = self.config.checkpoint
        if step == self.config.max_steps:
            return ck.save_on_finish
        return ck.interval_steps is not None and step % ck.interval_steps == 0

    def _save(self, app: AppState, step: int, tokens_seen: int) -> CheckpointInfo:
        t0 = time.perf_counter()
        info = self.ckpt.save(step, {"app": app,
                                     "trainer": self._trainer_state(step, tokens_seen)})
        self.hooks.on_event("checkpoint", {"seconds": time.perf_counter() - t0, "step": step,
                                           "bytes": info.total_bytes})
        return info

    def _train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer,
                    step: int) -> tuple[StepMetrics, bool]:
        t0 = time.perf_counter()
        cfg, w = self.config, self.world_size
        lr = lr_at(step, cfg.optim, cfg.max_steps)
        for group in optimizer.param_groups:
            group["lr"] = lr
        # Seed only this rank's generators: torch.manual_seed also walks every accelerator
        # backend, which costs ~0.4 ms a step on CPU-only builds.
        seed = (cfg.seed * 1_000_003 + step) * 1009 + self.rank
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        local_ids = self.sampler.local_batch(step, self.rank, w)
        micro = self.sampler.micro_batches(step, self.rank, w, cfg.data.micro_batch_size)
        # Every rank runs the same number of forward/backward passes (FSDP all-gathers in
        # each); ranks with fewer samples pad with zero-weight passes.
        n_passes = math.ceil(math.ceil(cfg.data.global_batch_size / w)
                             / cfg.data.micro_batch_size)
        filler = self.sampler.global_batch(step)[:1]
        scale = w / cfg.data.global_batch_size  # FSDP averages over ranks; undo, then / B
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        for i in range(n_passes):
            ids, weight = (micro[i], len(micro[i])) if i < len(micro) else (filler, 0)
            batch = _to_device(self.collate_fn(fetch(self.dataset, ids)), self.device)
            loss = self.loss_fn(model, batch)
            (loss * (weight * scale)).backward()
            if weight:
                loss_sum += loss.detach().double() * weight
                tokens += _count_tokens(batch)
        if cfg.optim.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
        stop_local = 1.0 if self.hooks.should_stop() else 0.0
        stats = torch.stack([loss_sum, torch.tensor(float(len(local_ids)), dtype=torch.float64,
                                                    device=self.device),
                             torch.tensor(float(tokens), dtype=torch.float64,
                                          device=self.device),
                             torch.tensor(stop_local, dtype=torch.float64, device=self.device)])
        work = dist.all_reduce(stats, async_op=True)  # overlaps the optimizer step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        work.wait()
        loss_total, samples, tokens_total, stops = stats.tolist()
        metrics = StepMetrics(
            step=step + 1, loss=loss_total / max(samples, 1.0), world_size=w,
            samples=int(samples), tokens=int(tokens_total), lr=lr,
            step_time_s=time.perf_counter() - t0, rank=self.rank,
            sample_ids=tuple(int(i) for i in local_ids))
        return metrics, stops > 0


def _to_device(batch: Any, device: torch.device) -> Any:
    if device.type == "cpu":
        return batch
    if isinstance(batch, torch.Tensor):
        return batch.to(device, non_blocking=True)
    if isinstance(batch, dict):
        return {k: _to_device(v, device) for k, v in batch.items()}
    if isinstance(batch, (list, tuple)):
        return type(batch)(_to_device(v, device) for v in batch)
    return batch


def _count_tokens(batch: Any) -> int:
    if isinstance(batch, dict) and isinstance(batch.get("input_ids"), torch.Tensor):
        return batch["input_ids"].numel()
    return 0


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
