"""Console progress for ``ElasticTrainer(on_progress=...)``: step lines and the scaling
timeline as it happens."""

from __future__ import annotations

import sys
from typing import TextIO

from elastic_ckpt.config import TrainConfig
from elastic_ckpt.coordinator import ScalingEvent
from elastic_ckpt.coordinator.coordinator import Progress
from elastic_ckpt.train import EvalMetrics, StepMetrics


def format_event(e: ScalingEvent) -> str:
    phases = " ".join(f"{k}={v:.2f}s" for k, v in e.phases.items())
    lost = "" if e.steps_lost is None else f", {e.steps_lost} steps lost"
    skipped = "".join(f"\n   WARNING: skipped corrupt checkpoint step {c['step']} (marked "
                      f"CORRUPT): {c['error']}" for c in e.skipped_checkpoints)
    skipped += "".join(f"\n   WARNING: {w}" for w in e.warnings)
    units = e.details.get("fsdp_units")
    model = "" if units is None else f", {len(units)} FSDP units"
    if "init_from" in e.details:
        read, full = e.details["init_bytes_read"] / 1e6, e.details["model_bytes"] / 1e6
        model += (f", weights from {e.details['init_from']} "
                  f"(rank 0 read {read:.1f} of {full:.1f} MB)")
    return (f"{e.kind}: {e.from_workers} -> {e.to_workers} workers{lost}{model}, "
            f"{e.total_s or 0:.2f}s total [{phases}]{skipped}")


def format_metrics(metrics: dict[str, float]) -> str:
    return "".join(f"  {k} {v:.4g}" for k, v in metrics.items())


def format_eval(m: EvalMetrics) -> str:
    return (f"eval  {m.step:6d}  loss {m.loss:.4f}{format_metrics(m.metrics)}  "
            f"({m.samples} samples, {m.eval_time_s:.2f}s)")


class ProgressPrinter:
    """Prints step, loss, world size and throughput every ``log_interval_steps``, and each
    scaling event when it completes."""

    def __init__(self, config: TrainConfig, out: TextIO = sys.stdout) -> None:
        self.every = config.log_interval_steps
        self.max_steps = config.max_steps
        self.out = out
        self.window: list[StepMetrics] = []

    def __call__(self, progress: Progress) -> None:
        for e in progress.events:
            print(f"-- {format_event(e)}", file=self.out, flush=True)
        for m in progress.steps:
            self.window.append(m)
            if m.step % self.every and m.step != self.max_steps:
                continue
            secs = sum(r.step_time_s for r in self.window) or 1e-9
            print(f"step {m.step:6d}/{self.max_steps}  loss {m.loss:.4f}  world {m.world_size}  "
                  f"lr {m.lr:.2e}  {sum(r.samples for r in self.window) / secs:8.1f} samples/s  "
                  f"{sum(r.tokens for r in self.window) / secs:9.0f} tok/s"
                  f"{format_metrics(m.metrics)}", file=self.out, flush=True)
            self.window = []
        for m in progress.evals:
            print(format_eval(m), file=self.out, flush=True)
