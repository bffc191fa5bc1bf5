"""Console progress for ``ElasticTrainer(on_progress=...)``: a progress bar on a terminal (step
lines elsewhere, e.g. Ray job logs), and the scaling timeline, evals and failures as they
happen."""

from __future__ import annotations

import collections
import sys
import time
from typing import TextIO

from tqdm import tqdm

from elastic_ckpt.config import TrainConfig
from elastic_ckpt.coordinator import FailureNotice, ScalingEvent
from elastic_ckpt.coordinator.coordinator import Progress
from elastic_ckpt.train import EvalMetrics, StepMetrics

RATE_WINDOW = 20
"""Steps the bar's tokens/s is averaged over."""


def _resumed(e: ScalingEvent) -> str:
    """Where the new group started: ``resumed_step`` is the step restored from, 0 when there
    was no checkpoint."""
    if e.resumed_step is None:
        return ""
    if e.resumed_step == 0:
        return ", fresh start" if e.kind == "start" else ", restarted from step 0 (no checkpoint)"
    return f", resumed from checkpoint step {e.resumed_step}"


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
    return (f"{e.kind}: {e.from_workers} -> {e.to_workers} workers{_resumed(e)}{lost}{model}, "
            f"{e.total_s or 0:.2f}s total [{phases}]{skipped}")


def format_failure(f: FailureNotice) -> str:
    if f.kind == "checkpoint_save":
        return (f"!! checkpoint of step {f.at_step} failed in the background; training "
                f"continues:\n{f.message.rstrip()}")
    then = "restarting from the latest checkpoint" if f.retrying else "giving up"
    return f"!! failure at step {f.at_step} ({f.kind}), {then}:\n{f.message.rstrip()}"


def format_metrics(metrics: dict[str, float]) -> str:
    return "".join(f"  {k} {v:.4g}" for k, v in metrics.items())


def format_eval(m: EvalMetrics) -> str:
    return (f"eval  {m.step:6d}  loss {m.loss:.4f}{format_metrics(m.metrics)}  "
            f"({m.samples} samples, {m.eval_time_s:.2f}s)")


def _isatty(out: TextIO) -> bool:
    try:
        return bool(out.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class ProgressPrinter:
    """On a terminal: a bar (step/max_steps, loss, tokens/s, world size, ETA) with each scaling
    event, eval and failure printed above it as it happens. Elsewhere (``out`` not a TTY: Ray
    job logs, pipes): a step line every ``log_interval_steps`` and at ``max_steps``, and the
    events, evals and failures as lines. ``bar`` forces either; call ``close()`` at the end."""

    def __init__(self, config: TrainConfig, out: TextIO = sys.stdout,
                 bar: bool | None = None) -> None:
        self.every = config.log_interval_steps
        self.max_steps = config.max_steps
        self.out = out
        self.use_bar = _isatty(out) if bar is None else bar
        self.window: list[StepMetrics] = []  # steps since the last step line
        self._bar: tqdm | None = None
        self._recent: collections.deque[StepMetrics] = collections.deque(maxlen=RATE_WINDOW)
        self._since: tuple[float, int] | None = None  # (time, step) the ETA's rate starts at

    def __call__(self, progress: Progress) -> None:
        # A start completes before anything can fail; a failure comes before its recovery.
        starts = [e for e in progress.events if e.kind == "start"]
        for e in starts:
            self._event(e)
        for f in progress.failures:
            self._line(format_failure(f))
        for e in progress.events:
            if e.kind != "start":
                self._event(e)
        for m in progress.steps:
            self._step(m)
        for m in progress.evals:
            self._line(format_eval(m))

    def close(self) -> None:
        """Finish the bar (its last state stays on screen); a no-op without one."""
        if self._bar is not None:
            self._bar.close()
            self._bar = None

    # -- output -----------------------------------------------------------------------------------
    def _line(self, text: str) -> None:
        if self._bar is not None:
            self._bar.write(text, file=self.out)
        else:
            print(text, file=self.out, flush=True)

    def _event(self, e: ScalingEvent) -> None:
        self._line(f"-- {format_event(e)}")
        self._since = None  # a new world size: a new rate
        self._recent.clear()

    def _step(self, m: StepMetrics) -> None:
        if self.use_bar:
            self._bar_step(m)
            return
        self.window.append(m)
        if m.step % self.every and m.step != self.max_steps:
            return
        secs = sum(r.step_time_s for r in self.window) or 1e-9
        print(f"step {m.step:6d}/{self.max_steps}  loss {m.loss:.4f}  world {m.world_size}  "
              f"lr {m.lr:.2e}  {sum(r.samples for r in self.window) / secs:8.1f} samples/s  "
              f"{sum(r.tokens for r in self.window) / secs:9.0f} tok/s"
              f"{format_metrics(m.metrics)}", file=self.out, flush=True)
        self.window = []

    def _bar_step(self, m: StepMetrics) -> None:
        now = time.monotonic()
        if self._since is None or m.step < self._since[1]:
            self._since = (now, m.step)
        self._recent.append(m)
        secs = sum(r.step_time_s for r in self._recent) or 1e-9
        tokens = sum(r.tokens for r in self._recent) / secs
        t0, step0 = self._since
        eta = "?"  # from the driver's clock since the last event (checkpoints included)
        if m.step >= self.max_steps:
            eta = tqdm.format_interval(0)
        elif m.step > step0 and now - t0 >= 1.0:  # steps that arrived together say nothing
            eta = tqdm.format_interval((self.max_steps - m.step) * (now - t0) / (m.step - step0))
        postfix = f"loss {m.loss:.4f}  {tokens:,.0f} tok/s  world {m.world_size}  ETA {eta}"
        if self._bar is None:
            self._bar = tqdm(total=self.max_steps, initial=m.step, file=self.out, unit="step",
                             dynamic_ncols=True, postfix=postfix,
                             bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt}{postfix}")
            return
        self._bar.n = m.step  # steps may go back after a restore
        self._bar.set_postfix_str(postfix, refresh=False)
        self._bar.refresh()
