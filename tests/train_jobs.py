"""Rank-level jobs and tiny configs shared by the training tests.

The job functions run on every rank of a gloo group started by
``elastic_ckpt.train.local.run_ranks`` (so they live at module level, importable by ``spawn``).
They return plain data: per-step metrics (the loss and the sample ledger), what the restore
saw, and optionally the final parameters gathered to full tensors.
"""

from __future__ import annotations

import dataclasses
import shutil
from typing import Any

import torch
import torch.distributed as dist

from elastic_ckpt.config import TrainConfig
from elastic_ckpt.data import SyntheticLMDataset
from elastic_ckpt.errors import ConfigError
from elastic_ckpt.train import RankHooks, TrainJob, TrainSpec, default_model
from elastic_ckpt.train.events import Restored


def tiny_config(uri: str, *, max_steps: int = 12, global_batch_size: int = 17,
                micro_batch_size: int = 4, num_samples: int = 96, seq_len: int = 16,
                vocab_size: int = 64, d_model: int = 32, n_layers: int = 2, n_heads: int = 2,
                data_seed: int = 0, interval_steps: int | None = None,
                **optim: Any) -> TrainConfig:
    """A GPT small enough for gloo ranks on two CPU cores. ``num_samples`` is chosen by the
    callers so that runs cross epoch boundaries (batches that straddle two permutations)."""
    return TrainConfig(
        max_steps=max_steps,
        checkpoint={"uri": uri, "interval_steps": interval_steps, "keep_last": None},
        data={"global_batch_size": global_batch_size, "micro_batch_size": micro_batch_size,
              "seed": data_seed,
              "dataset": {"num_samples": num_samples, "seq_len": seq_len,
                          "vocab_size": vocab_size}},
        model={"vocab_size": vocab_size, "d_model": d_model, "n_layers": n_layers,
               "n_heads": n_heads, "max_seq_len": seq_len},
        optim={"warmup_steps": 2, **optim},
    )


def with_fields(config: TrainConfig, **sections: dict[str, Any]) -> TrainConfig:
    """``config`` with fields of some sections replaced (validated again)."""
    raw = config.model_dump(mode="json")
    for section, fields in sections.items():
        raw[section] = {**(raw.get(section) or {}), **fields}
    return TrainConfig.model_validate(raw)


def smallest_config(uri: str, **kw: Any) -> TrainConfig:
    """The tiniest GPT: for tests that spawn many groups (up to four ranks on two cores)."""
    args = dict(global_batch_size=7, micro_batch_size=2, num_samples=20, seq_len=8,
                vocab_size=32, d_model=16, n_layers=1, n_heads=2)
    args.update(kw)
    return tiny_config(uri, **args)


def dataset_for(config: TrainConfig) -> SyntheticLMDataset:
    ds = config.data.dataset
    return SyntheticLMDataset(ds.num_samples, ds.seq_len, ds.vocab_size, seed=0)


@dataclasses.dataclass(frozen=True)
class Segment:
    """One ``RankTrainer.run()``: train under ``config`` until global step ``stop_at`` (None:
    to ``max_steps``). ``copy_from``: rank 0 first copies that checkpoint root to
    ``config.checkpoint.uri`` (a private copy to resume from without touching the original)."""

    config: TrainConfig
    stop_at: int | None = None
    copy_from: str | None = None
    gather_params: bool = False
    spec: TrainSpec = TrainSpec()
    """The builders (default: the model ``config.model`` names, its loss, AdamW...)."""
    dataset: Any = None
    """None: ``dataset_for(config)``."""
    eval_dataset: Any = None


def run_segment(rank: int, world_size: int, seg: Segment) -> dict[str, Any]:
    """Collective. Runs one segment; returns its ledger (one row per step this rank ran),
    what was restored, the ``RankResult``, and (``gather_params``) the full parameters."""
    if seg.copy_from is not None:
        if rank == 0:
            shutil.copytree(seg.copy_from, seg.config.checkpoint.uri)
        dist.barrier()
    built: list[torch.nn.Module] = []
    steps: list[Any] = []
    evals: list[Any] = []
    events: list[tuple[str, dict[str, Any]]] = []
    restored: dict[str, Any] = {}
    position = {"step": 0}  # the last completed global step, as this run knows it
    build = seg.spec.model_fn or default_model(seg.config)[0]
    loss_fn = seg.spec.loss_fn or default_model(seg.config)[1]

    def model_fn() -> torch.nn.Module:
        model = build()
        built.append(model)  # fully_shard works in place: this is the trained module
        return model

    def on_event(event: Any) -> None:
        fields = dataclasses.asdict(event)
        events.append((type(event).__name__, {k: fields[k] for k in ("step", "is_async",
                                                                     "waited_s")
                                              if k in fields}))
        if isinstance(event, Restored):
            restored.update(fields)
            position["step"] = fields["step"]

    def on_step(metrics: Any) -> None:
        steps.append(metrics)
        position["step"] = metrics.step

    def should_stop() -> bool:  # polled during step position+1, before on_step
        return seg.stop_at is not None and position["step"] + 1 >= seg.stop_at

    hooks = RankHooks(should_stop=should_stop, on_step=on_step, on_event=on_event,
                      on_eval=evals.append)
    spec = dataclasses.replace(seg.spec, model_fn=model_fn, loss_fn=loss_fn)
    dataset = seg.dataset if seg.dataset is not None else dataset_for(seg.config)
    job = TrainJob(seg.config, spec, dataset, seg.eval_dataset)
    result = job.trainer(hooks, torch.device("cpu")).run()
    params = None
    if seg.gather_params:
        params = full_params(built[0])
    return {
        "rank": rank,
        "world_size": world_size,
        "steps": [(m.step, m.loss, tuple(m.sample_ids), m.world_size, m.samples, m.lr, m.lrs,
                   m.metrics) for m in steps],
        "evals": [(e.step, e.loss, e.metrics, e.samples) for e in evals],
        "events": events,
        "fsdp_units": restored.get("fsdp_units"),
        "init_bytes_read": restored.get("init_bytes_read"),
        "model_bytes": restored.get("model_bytes"),
        "restored_step": result.restored_step,
        "restored_from_world_size": restored.get("from_world_size"),
        "skipped": [c["step"] for c in restored.get("skipped", [])],
        "warnings": restored.get("warnings", []),
        "final_step": result.final_step,
        "stopped": result.stopped,
        "checkpoint_step": None if result.checkpoint is None else result.checkpoint.step,
        "params": params if rank == 0 else None,
    }


def full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Collective. Every parameter (and persistent buffer) of a sharded model as a full
    tensor, by state-dict name."""
    out = {}
    for name, t in model.state_dict().items():
        t = t.full_tensor() if hasattr(t, "full_tensor") else t
        out[name] = t.detach().clone()
    return out


def run_segments(rank: int, world_size: int, segments: list[Segment]) -> list[dict[str, Any]]:
    """Collective. Several ``RankTrainer`` runs one after another in this process group."""
    return [run_segment(rank, world_size, seg) for seg in segments]


def restore_errors(rank: int, world_size: int, original: TrainConfig,
                   changed: list[TrainConfig]) -> dict[str, Any]:
    """Collective. Trains ``original`` (which saves at its end), then tries to resume from
    that checkpoint under each of ``changed``; returns what each attempt raised."""
    first = run_segment(rank, world_size, Segment(original))
    outcomes = []
    for config in changed:
        try:
            out = run_segment(rank, world_size, Segment(config, stop_at=first["final_step"] + 1))
        except ConfigError as exc:
            outcomes.append({"error": "ConfigError", "field": getattr(exc, "field", None),
                             "message": str(exc)})
        else:
            outcomes.append({"error": None, "restored_step": out["restored_step"],
                             "warnings": out["warnings"],
                             "lrs": [row[5] for row in out["steps"]]})
    return {"first": first, "outcomes": outcomes}
