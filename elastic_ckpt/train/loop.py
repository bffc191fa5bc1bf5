"""One rank's life: build and shard the model, restore (or start from pretrained weights),
run the step loop, evaluate, checkpoint.

``RankTrainer.run()`` is collective over the default process group: every rank of the group
calls it with the same job. It decides nothing about scaling; the runtime above sets the
stop flag and restarts the group at another size.
"""

from __future__ import annotations

import base64
import logging
import socket
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from elastic_ckpt.checkpoint import AppState, CheckpointInfo, CheckpointManager
from elastic_ckpt.config import OptimConfig
from elastic_ckpt.data import ElasticSampler, collate
from elastic_ckpt.checkpoint.async_save import SaveHandle
from elastic_ckpt.checkpoint.memory_tier import MemoryTier
from elastic_ckpt.checkpoint.peer import HeldShards
from elastic_ckpt.errors import (
    CheckpointNotFoundError,
    CheckpointSavesFailedError,
    ConfigError,
    ElasticCkptError,
    StorageError,
)
from elastic_ckpt.train.accumulate import WeightedSums, agree_on_names, split_loss
from elastic_ckpt.train.batch import count_tokens, load_batch
from elastic_ckpt.train.distributed import device_mesh
from elastic_ckpt.train.evaluate import evaluate
from elastic_ckpt.train.events import (
    CheckpointCommitted,
    CheckpointFailed,
    CheckpointStaged,
    FirstStep,
    Restored,
)
from elastic_ckpt.train.init import materialize
from elastic_ckpt.train.job import (
    RankHooks,
    RankResult,
    StepMetrics,
    TrainJob,
    default_model,
)
from elastic_ckpt.train.optim import builtin_lr_scheduler, default_optimizer
from elastic_ckpt.train.parallelize import default_parallelize, fsdp_units, model_class_name
from elastic_ckpt.train.pretrained import load_pretrained
from elastic_ckpt.train.schedule import lr_at

log = logging.getLogger(__name__)


class RankTrainer:
    """Runs training for one rank of the default process group."""

    def __init__(self, job: TrainJob, hooks: RankHooks = RankHooks(),
                 device: torch.device | None = None, held: HeldShards | None = None,
                 memory: MemoryTier | None = None) -> None:
        config, spec = job.config, job.spec
        self.job = job
        self.config = config
        self.dataset = job.dataset
        model_fn, loss_fn = default_model(config)
        self.model_fn = spec.model_fn or model_fn
        self.loss_fn = spec.loss_fn or loss_fn
        self.eval_fn = spec.eval_fn or self.loss_fn
        self.collate_fn = spec.collate_fn or collate
        self.hooks = hooks
        self.device = device or torch.device("cpu")
        self.rank = dist.get_rank()
        self.world_size = dist.get_world_size()
        data = config.data
        self.sampler = ElasticSampler(len(self.dataset), data.global_batch_size, data.seed,
                                      data.shuffle)
        ck = config.checkpoint
        self.ckpt = CheckpointManager(ck.uri, keep_last=ck.keep_last, keep_every=ck.keep_every,
                                      recycle_files=ck.recycle_files,
                                      read_threads=ck.read_threads)
        self.restore_warnings: list[str] = []
        self._metric_names: list[str] | None = None
        self.current_step: int | None = None
        """The step being trained (1-based) while the loop runs; None before the first one."""
        self.restored_step: int | None = None
        """The step the run resumed from once the restore is done (0: no checkpoint)."""
        self.last_committed: CheckpointInfo | None = None
        self.held = held
        """The shards this process wrote to a checkpoint in its previous group (a stop for a
        resize); the restore takes what it can of that checkpoint from the group's memory."""
        if memory is None and ck.memory_tier:  # one group only (the local launcher)
            memory = MemoryTier(socket.gethostname())
        self.memory = memory if ck.memory_tier else None
        """The peer-memory tier of this process (``checkpoint.memory_tier``): it outlives
        the group when the runtime keeps the process (``TrainWorker``)."""
        self._in_flight: SaveHandle | None = None  # the async save not yet reported
        self._failed_saves = 0  # background saves failed in a row

    # -- setup -------------------------------------------------------------------------------
    def _build(self) -> tuple[nn.Module, torch.optim.Optimizer, Any | None]:
        """The model, its optimizer and the user's scheduler (None: the built-in schedule,
        which ``_builtin_schedule`` attaches after the restore)."""
        cfg, spec = self.config, self.job.spec
        torch.manual_seed(cfg.seed)  # a model built off meta: the same weights on every rank
        model = self._shard(self.model_fn(), device_mesh(self.device))
        materialize(model, self.device, cfg.seed)
        model.train()
        optimizer = (spec.optimizer_fn(model) if spec.optimizer_fn is not None
                     else default_optimizer(model, cfg.optim))
        scheduler = (spec.lr_scheduler_fn(optimizer) if spec.lr_scheduler_fn is not None
                     else None)
        return model, optimizer, scheduler

    def _shard(self, model: nn.Module, mesh: Any) -> nn.Module:
        spec, cfg = self.job.spec, self.config
        if spec.parallelize_fn is not None:
            return spec.parallelize_fn(model, mesh)
        p = cfg.parallel
        return default_parallelize(
            model, mesh, mixed_precision=cfg.mixed_precision,
            activation_checkpointing=p.activation_checkpointing,
            reshard_after_forward=p.reshard_after_forward, compile=p.compile,
            warn=self.rank == 0 and mesh.size() > 1)

    def _builtin_schedule(self, optimizer: torch.optim.Optimizer, base_lrs: list[float],
                          step: int) -> Any:
        """The built-in schedule for a run at ``step``. It is a pure function of the step and
        this run's config, so it is not checkpointed: a restored optimizer carries the saved
        run's lrs, and a resume with another ``optim.lr`` or ``max_steps`` must train on the
        new schedule (the warning ``_schedule_changes`` prints says so)."""
        for group, base in zip(optimizer.param_groups, base_lrs):
            group["initial_lr"] = base
        return builtin_lr_scheduler(optimizer, self.config.optim, self.config.max_steps,
                                    step=step)

    def _model_record(self, model: nn.Module) -> dict[str, Any]:
        """What export needs to write an HF directory: the class, its config, tied names."""
        groups: dict[int, list[str]] = {}
        for name, param in model.named_parameters(remove_duplicate=False):
            groups.setdefault(id(param), []).append(name)
        config = getattr(model, "config", None)
        to_dict = getattr(config, "to_dict", None)
        return {"class": model_class_name(model),
                "config": to_dict() if callable(to_dict) else None,
                "tied": [names for names in groups.values() if len(names) > 1]}

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
        held, self.held = self.held, None  # dropped once loaded: they are the old model's
        try:
            info = self.ckpt.load(state, fallback=self.config.checkpoint.fallback_on_corrupt,
                                  held=held, memory=self.memory)
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

    def _init_from(self, model: nn.Module) -> dict[str, Any]:
        """Pretrained weights for a run with no checkpoint yet (``checkpoint.init_from``)."""
        ck = self.config.checkpoint
        if ck.init_from is None:
            return {}
        report = load_pretrained(model, ck.init_from, ck.init_key_prefix)
        if self.rank == 0:
            log.info("initialized %d tensors from %s (this rank read %.1f of %.1f MB)",
                     report.tensors, report.uri, report.bytes_read / 1e6,
                     report.model_bytes / 1e6)
        return {"init_from": report.uri, "init_bytes_read": report.bytes_read,
                "model_bytes": report.model_bytes, "init_seconds": report.seconds}

    def _trainer_state(self, step: int, tokens_seen: int) -> dict[str, Any]:
        return {"step": step, "samples_seen": step * self.config.data.global_batch_size,
                "tokens_seen": tokens_seen, "world_size": self.world_size,
                "data": self._data_fingerprint(), "schedule": self._schedule_settings(),
                "rng": _encode_rng(torch.get_rng_state())}

    # -- the loop ----------------------------------------------------------------------------
    def run(self) -> RankResult:
        started = time.perf_counter()
        model, optimizer, scheduler = self._build()
        user_scheduler = scheduler is not None
        base_lrs = [float(g["lr"]) for g in optimizer.param_groups]
        app = AppState(model, optimizer, scheduler)
        trainer_state: dict[str, Any] = {}
        t0 = time.perf_counter()
        step, info = self._restore({"app": app, "trainer": trainer_state})
        pretrained = self._init_from(model) if info is None else {}
        if not user_scheduler:
            scheduler = self._builtin_schedule(optimizer, base_lrs, step)
        restored = None if info is None else step
        self.restored_step = step
        from_memory = self.ckpt.last_from_memory
        self.last_committed = self.ckpt.latest() if from_memory else info
        if self.memory is not None:
            self.memory.attach()  # after the restore, which may need the old group's pieces
        read = self.ckpt.last_read_stats
        self.hooks.on_event(Restored(
            seconds=time.perf_counter() - t0, step=step, build_seconds=t0 - started,
            from_world_size=None if info is None else info.world_size,
            fsdp_units=fsdp_units(model),
            skipped=[{"step": s, "error": e} for s, e in self.ckpt.last_skipped],
            warnings=list(self.restore_warnings), from_peers_bytes=read.bytes_from_peers,
            from_storage_bytes=read.bytes_read, from_memory=from_memory, **pretrained))
        record = self._model_record(model)
        tokens_seen = int(trainer_state.get("tokens_seen", 0))
        stopped = False
        while step < self.config.max_steps:
            self.current_step = step + 1
            metrics, stop = self._train_step(model, optimizer, scheduler, step)
            step += 1
            tokens_seen += metrics.tokens
            if step == (restored or 0) + 1:
                self.hooks.on_event(FirstStep(metrics.step_time_s,
                                              time.perf_counter() - started, step))
            self.hooks.on_step(metrics)
            self._collect_save(block=False)
            if self._snapshot_due(step, stop):
                self.ckpt.snapshot(step, {"app": app, "model": record,
                                          "trainer": self._trainer_state(step, tokens_seen)},
                                   self.memory)
            # Save before evaluating: a stop request (a drain deadline) must not wait for an
            # eval, and a failing eval_fn must not cost the checkpoint. Saves that end this
            # group (a stop, the last step) are committed before the ranks return.
            if stop or self._due(step):
                self._save(app, record, step, tokens_seen,
                           final=stop or step == self.config.max_steps,
                           hold=stop and step < self.config.max_steps
                           and self.config.checkpoint.reshard_from_memory)
            if self._eval_due(step) and not (stop and step < self.config.max_steps):
                self._evaluate(model, step)
            if stop:
                stopped = step < self.config.max_steps
                break
        self._collect_save(block=True)
        return RankResult(final_step=step, stopped=stopped, checkpoint=self.last_committed,
                          restored_step=restored)

    def close(self) -> None:
        """Settle what this rank's run left in the background, once ``run()`` ended (however
        it ended): an async save still waiting for peers of a group that is gone stops
        waiting (it commits only if every rank's data is already durable), and the save
        thread stops. A process that trains again in a new group calls this first, so no
        thread of the old group touches the checkpoint root while the new one restores."""
        self.ckpt.close(abandon=True)

    def _due(self, step: int) -> bool:
        ck = self.config.checkpoint
        if step == self.config.max_steps:
            return ck.save_on_finish
        return ck.interval_steps is not None and step % ck.interval_steps == 0

    def _snapshot_due(self, step: int, stop: bool) -> bool:
        """A peer-memory snapshot after this step? Not on a stop (its checkpoint is committed
        before the group ends) nor at the last step."""
        return (self.memory is not None and not stop and step < self.config.max_steps
                and step % self.config.checkpoint.memory_interval_steps == 0)

    def _eval_due(self, step: int) -> bool:
        if self.job.eval_dataset is None:
            return False
        every = self.config.eval.interval_steps
        return step == self.config.max_steps or (every is not None and step % every == 0)

    def _evaluate(self, model: nn.Module, step: int) -> None:
        ev, data = self.config.eval, self.job.eval_dataset
        num_samples = min(len(data), ev.max_samples or len(data))
        micro_batch_size = ev.micro_batch_size or self.config.data.micro_batch_size
        metrics = evaluate(model, data, self.eval_fn, self.collate_fn, step=step,
                           num_samples=num_samples, micro_batch_size=micro_batch_size,
                           device=self.device)
        self.hooks.on_eval(metrics)

    def _save(self, app: AppState, record: dict[str, Any], step: int, tokens_seen: int,
              final: bool, hold: bool = False) -> None:
        """Checkpoint ``step`` (collective). An interval save with ``checkpoint.async_save``
        stages and returns (its commit is reported when it lands); a ``final`` one is committed
        here, after the save in flight, and its ``seconds`` include that wait. ``hold`` (a stop
        for a resize): keep the saved shards for the next group (``self.ckpt.held``)."""
        t0 = time.perf_counter()
        waited = self._collect_save(block=True)
        state = {"app": app, "model": record,
                 "trainer": self._trainer_state(step, tokens_seen)}
        if self.config.checkpoint.async_save and not final:
            try:
                handle = self._in_flight = self.ckpt.async_save(
                    step, state, overlap_staging=self.config.checkpoint.overlap_staging)
            except StorageError as exc:  # unreachable before staging: as if it failed later
                self._save_failed(step, exc)  # (every rank got the same error)
                return
            self.hooks.on_event(CheckpointStaged(
                step=step, seconds=time.perf_counter() - t0, waited_s=waited,
                staged_s=handle.staged_s, staging_bytes=self.ckpt.staging_bytes))
            return
        info = self.ckpt.save(step, state, hold=hold)
        self.last_committed, self._failed_saves = info, 0
        self.hooks.on_event(CheckpointCommitted(
            step=step, seconds=time.perf_counter() - t0, bytes=info.total_bytes,
            is_async=False, waited_s=waited))

    def _collect_save(self, block: bool) -> float:
        """Report the async save in flight once it has landed (``block``: wait for it). A
        failed one is a warning; ``checkpoint.max_failed_saves`` in a row end the run.
        Returns the seconds waited."""
        handle = self._in_flight
        if handle is None:
            return 0.0
        step = handle.step
        if not block and not handle.done():
            return 0.0
        t0 = time.perf_counter()
        try:
            info = handle.result()
        except ElasticCkptError as exc:
            self._in_flight = None
            self._save_failed(step, exc)
            return time.perf_counter() - t0
        self._in_flight, self.last_committed, self._failed_saves = None, info, 0
        self.hooks.on_event(CheckpointCommitted(
            step=step, seconds=handle.staged_s + handle.persist_s, bytes=info.total_bytes,
            is_async=True, stall_s=handle.stall_s, persist_s=handle.persist_s,
            staging_bytes=self.ckpt.staging_bytes))
        return time.perf_counter() - t0

    def _save_failed(self, step: int, exc: ElasticCkptError) -> None:
        """A save that did not commit: a warning and an event; ``checkpoint.max_failed_saves``
        in a row end the run, naming the cause and the last committed checkpoint."""
        self._failed_saves += 1
        limit = self.config.checkpoint.max_failed_saves
        last = self.last_committed.uri if self.last_committed else "none"
        if self.rank == 0:
            log.warning("checkpoint of step %d failed (%d in a row, limit %d); training "
                        "continues: %s", step, self._failed_saves, limit, exc)
        self.hooks.on_event(CheckpointFailed(step, str(exc), self._failed_saves))
        if self._failed_saves >= limit:
            raise CheckpointSavesFailedError(
                f"{self._failed_saves} checkpoint saves in a row failed "
                f"(checkpoint.max_failed_saves={limit}); the last, of step {step}: {exc}. "
                f"Last committed checkpoint: {last}. Free space or fix the storage, then "
                "re-run: it resumes from there.", step=step, path=last) from None

    def _train_step(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler: Any,
                    step: int) -> tuple[StepMetrics, bool]:
        t0 = time.perf_counter()
        cfg, w = self.config, self.world_size
        lrs = tuple(float(g["lr"]) for g in optimizer.param_groups)
        # Seed only this rank's generators: torch.manual_seed also walks every accelerator
        # backend, which costs ~0.4 ms a step on CPU-only builds.
        seed = (cfg.seed * 1_000_003 + step) * 1009 + self.rank
        torch.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)
        local_ids = self.sampler.local_batch(step, self.rank, w)
        # Every rank runs the same number of forward/backward passes (FSDP all-gathers in
        # each); ranks with fewer samples pad with zero-weight passes.
        passes = self.sampler.step_passes(step, self.rank, w, cfg.data.micro_batch_size)
        scale = self.sampler.loss_scale(w)  # FSDP averages over ranks; undo, then / B
        sums = WeightedSums(self.device)
        for ids, weight in passes:
            batch = load_batch(self.dataset, ids, self.collate_fn, self.device)
            loss, extra = split_loss(self.loss_fn(model, batch))
            (loss * (weight * scale)).backward()
            sums.add(loss, extra, weight, count_tokens(batch) if weight else 0)
        names = list(sums.metrics or {})
        if self._metric_names is None:  # once per run: the reduce below relies on it
            agree_on_names(names, "loss_fn")
            self._metric_names = names
        elif names != self._metric_names:
            raise ConfigError(f"loss_fn returned metrics {names} at step {step + 1} but "
                              f"{self._metric_names} before; return the same names every step",
                              field="loss_fn")
        if cfg.optim.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.optim.grad_clip_norm)
        stop_local = 1.0 if self.hooks.should_stop() else 0.0
        stats, work = sums.start_reduce([stop_local])  # overlaps the optimizer step
        self.ckpt.wait_staged()  # an async save's deferred copies are made before the step
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()
        work.wait()
        loss_mean, metric_means, samples, tokens, (stops,) = sums.finish(stats)
        metrics = StepMetrics(
            step=step + 1, loss=loss_mean, world_size=w, samples=samples, tokens=tokens,
            lr=lrs[0], step_time_s=time.perf_counter() - t0, rank=self.rank,
            sample_ids=tuple(int(i) for i in local_ids), metrics=metric_means, lrs=lrs)
        return metrics, stops > 0


def _encode_rng(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _decode_rng(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def warm_up(job: TrainJob) -> float:
    """Run a rank's one-time setup ahead of its first group, in a process that has none yet
    (a hot spare): the model is built and sharded on the meta device (no memory, no weights)
    in a one-rank gloo group that is destroyed again. A process's first ``fully_shard`` costs
    ~0.9 s of setup that later ones do not (the built-in GPT, 2 vCPU). Best effort: returns
    the seconds spent, also when the user's builders cannot run on meta."""
    t0 = time.perf_counter()
    if dist.is_initialized():
        return 0.0
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    try:
        trainer = RankTrainer(job)
        with torch.device("meta"):
            trainer._shard(trainer.model_fn(), device_mesh(torch.device("cpu")))
    except Exception as exc:  # noqa: BLE001 - only a warm-up: the real build will tell
        log.info("warm-up build skipped: %s: %s", type(exc).__name__, exc)
    finally:
        dist.destroy_process_group()
    return time.perf_counter() - t0
