"""The picture of ``elastic-ckpt timeline``: world size over time with each scaling event's
phases as coloured spans, and beneath it the loss, evals, checkpoints and failures, drawn with
matplotlib (imported only in ``render_png``: Agg backend, no pyplot, never a window) from the
records and layout of ``elastic_ckpt.cli.timeline``."""

from __future__ import annotations

import os
import statistics
from typing import Any

from elastic_ckpt.cli.timeline import (
    METRICS_FILE,
    EventRecord,
    RunRecords,
    _dash,
    _duration,
    _iso,
    drawn_spans,
    latest_per_step,
    loss_segments,
    phase_order,
    phase_spans,
    run_end,
    run_start,
    summary,
    world_size_steps,
)
from elastic_ckpt.errors import ElasticCkptError, StorageError

MATPLOTLIB_HINT = "--out needs matplotlib: pip install matplotlib (or elastic_ckpt[plot])"

PHASE_COLORS = {
    "detect": "#8c8c8c", "drain": "#f28e2b", "save": "#e15759", "teardown": "#b07aa1",
    "wait_capacity": "#d7d2cb", "placement": "#76b7b2", "actors": "#4e79a7",
    "rendezvous": "#59a14f", "build": "#edc948", "load": "#ff9da7", "first_step": "#9c755f",
}
OTHER_PHASE_COLOR = "#444444"
MIN_SPAN_FRACTION = 0.004
"""Phases shorter than this fraction of the time axis are drawn this wide (the text and JSON
outputs carry the exact seconds)."""
MAX_LABEL_ROWS = 3


def render_png(run: RunRecords, out: str) -> str:
    """Draw the timeline of ``run`` into the PNG file ``out``; returns its absolute path."""
    try:  # no pyplot: no global backend, never a window
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ElasticCkptError(MATPLOTLIB_HINT, module="matplotlib") from None

    t0, t1 = run_start(run), run_end(run)
    span = max(t1 - t0, 1e-3)
    fig = Figure(figsize=(13, 7.2), dpi=110)
    FigureCanvasAgg(fig)
    grid = fig.add_gridspec(2, 1, height_ratios=(1.15, 1), hspace=0.08, left=0.06,
                            right=0.80, top=0.91, bottom=0.09)
    top = fig.add_subplot(grid[0])
    bottom = fig.add_subplot(grid[1], sharex=top)
    top.set_xlim(-0.01 * span, 1.01 * span)

    _draw_world_size(top, run, t0, t1)
    _draw_events(fig, top, bottom, run, t0, span)
    _draw_loss(bottom, run, t0)
    _draw_failures(top, bottom, run, t0)

    s = summary(run)
    steps = (f"{s['final_step']} steps" if s["final_step"] is not None else
             f"steps unknown (no {METRICS_FILE})" if not run.has_metrics else "no steps yet")
    fig.suptitle(f"{os.path.basename(run.run_dir)}: {steps}, {len(run.events)} scaling "
                 f"events, {_duration(s['total_s'])}", fontsize=13, x=0.43)
    bottom.set_xlabel(f"seconds since the run's first record ({_iso(t0)})")
    top.tick_params(labelbottom=False)
    top.legend(handles=_phase_handles(run), title="phases", loc="upper left",
               bbox_to_anchor=(1.01, 1.0), fontsize=8, title_fontsize=9, frameon=False)
    handles, labels = bottom.get_legend_handles_labels()
    if handles:
        bottom.legend(handles, labels, loc="upper left", bbox_to_anchor=(1.01, 1.0),
                      fontsize=8, frameon=False)
    out = os.path.abspath(out)
    try:
        fig.savefig(out, format="png")
    except OSError as exc:
        raise StorageError(f"cannot write {out}: {exc}", path=out) from None
    return out


def _draw_world_size(ax, run: RunRecords, t0: float, t1: float) -> None:
    points = world_size_steps(run.events, t0, t1)
    top_size = max([n for _, n in points] + [1])
    ax.step([t for t, _ in points], [n for _, n in points], where="post", color="#1f3b73",
            linewidth=2, zorder=3)
    # The world size fills the lower 60% of the panel; the phase lane and labels sit above it.
    ax.set_ylim(-0.05 * top_size, top_size / 0.58)
    ax.set_yticks(int_ticks(top_size))
    ax.set_ylabel("workers")
    ax.grid(axis="y", alpha=0.25)


def int_ticks(top: int, most: int = 6) -> list[int]:
    """At most about ``most`` round integer ticks from 0, always ending at ``top``."""
    step = next(m * 10 ** k for k in range(12) for m in (1, 2, 4, 5)
                if top / (m * 10 ** k) <= most)
    ticks = list(range(0, top + 1, step))
    if ticks[-1] != top:
        if top - ticks[-1] <= step / 2 and len(ticks) > 1:
            ticks.pop()
        ticks.append(top)
    return ticks


def _draw_events(fig, top, bottom, run: RunRecords, t0: float, span: float) -> None:
    lane = top.get_xaxis_transform()  # x in seconds, y in axes fraction
    renderer = fig.canvas.get_renderer()
    placed: list[list[Any]] = [[] for _ in range(MAX_LABEL_ROWS)]
    unlabelled, widened = 0, False
    min_width = MIN_SPAN_FRACTION * span
    for e in run.events:
        spans = phase_spans(e, t0)
        bars = drawn_spans(spans, min_width)
        widened = widened or any(0 < s.seconds < min_width for s in spans)
        # The shading is the event's true extent; the bars may be wider (short phases).
        start = min([e.started_unix_s - t0] + [s.start_s for s in spans])
        end = e.end_unix_s - t0
        for ax in (top, bottom):
            ax.axvspan(start, end, color="#e15759" if e.kind == "failure" else "#999999",
                       alpha=0.08, linewidth=0, zorder=0)
        end = max([end] + [x + width for _, x, width in bars])
        for phase, x, width in bars:
            top.broken_barh([(x, width)], (0.62, 0.09), transform=lane, zorder=4,
                            facecolors=PHASE_COLORS.get(phase, OTHER_PHASE_COLOR),
                            edgecolors="white", linewidth=0.4)
        if not _place_label(top, renderer, placed, e, start, end):
            unlabelled += 1
    if unlabelled:
        top.text(0.995, 0.985, f"{unlabelled} events not labelled (crowded); see --text",
                 transform=top.transAxes, ha="right", va="top", fontsize=7, color="#555555")
    note = ("Shaded: each event from its detection to its first step at the new size. detect "
            "is timed before an event starts; save is the tail of drain.")
    if widened:
        note += (f" Phases under {_secs_short(min_width)} are drawn that wide "
                 "(exact seconds: --text).")
    fig.text(0.06, 0.012, note, fontsize=7.5, color="#555555", ha="left", va="bottom")


def _event_label(e: EventRecord) -> str:
    text = f"{e.kind} {e.from_workers}\u2192{_dash(e.to_workers)}"
    if e.steps_lost:
        text += f", {e.steps_lost} step{'s' if e.steps_lost != 1 else ''} lost"
    return text


def _place_label(ax, renderer, placed: list[list[Any]], e: EventRecord, start: float,
                 end: float) -> bool:
    """Put the event's label in the lowest label row where it overlaps no other label; keep it
    inside the axes (right-aligned to the event's end near the right edge)."""
    axes_box = ax.get_window_extent(renderer)
    text = ax.text(start, 0.0, _event_label(e), transform=ax.get_xaxis_transform(),
                   fontsize=8, ha="left", va="bottom", zorder=5,
                   color="#b00020" if e.kind == "failure" else "#222222")
    for row in range(MAX_LABEL_ROWS):
        text.set_y(0.735 + 0.085 * row)
        text.set_x(start)
        text.set_horizontalalignment("left")
        box = text.get_window_extent(renderer)
        if box.x1 > axes_box.x1:
            text.set_x(end)
            text.set_horizontalalignment("right")
            box = text.get_window_extent(renderer)
        padded = box.expanded(1.0, 1.0).padded(4)
        if not any(padded.overlaps(other) for other in placed[row]):
            placed[row].append(box)
            return True
    text.remove()
    return False


def _draw_loss(ax, run: RunRecords, t0: float) -> None:
    ax.set_ylabel("loss")
    if not run.has_metrics:
        _note(ax, f"no {METRICS_FILE} in this run directory: loss and checkpoints are not "
                  "shown")
        return
    steps = latest_per_step(run.steps)
    if steps:
        xs, ys = loss_segments(steps, run.events, t0)
        ax.plot(xs, ys, color="#1f77b4",
                linewidth=1.4, marker="." if len(steps) <= 80 else None, markersize=4,
                label="train loss (latest per step)")
    evals = latest_per_step(run.evals)
    if evals:
        ax.plot([r.time - t0 for r in evals], [r.loss for r in evals], linestyle="none",
                marker="D", markersize=5, color="#ff7f0e", label="eval loss")
    if not steps and not evals:
        _note(ax, f"no step records in {METRICS_FILE} yet")
    if run.checkpoints:
        saves = [c.seconds for c in run.checkpoints]
        ax.vlines([c.time - t0 for c in run.checkpoints], 0, 0.07,
                  transform=ax.get_xaxis_transform(), color="#2c7a3f", linewidth=1.5,
                  label=f"checkpoint ({len(saves)}, median {statistics.median(saves):.2f} s)")
    ax.grid(alpha=0.25)


def _draw_failures(top, bottom, run: RunRecords, t0: float) -> None:
    if run.has_metrics:
        times = [f.time - t0 for f in run.failures]
    else:
        times = [e.started_unix_s - t0 for e in run.events if e.kind == "failure"]
    if not times:
        return
    top.plot(times, [0] * len(times), linestyle="none", marker="X", markersize=10,
             color="#d62728", zorder=6, clip_on=False)
    for i, t in enumerate(times):
        bottom.axvline(t, color="#d62728", linestyle="--", linewidth=1, alpha=0.8,
                       label="failure" if i == 0 else None)


def _phase_handles(run: RunRecords) -> list[Any]:
    from matplotlib.patches import Patch

    names = phase_order({p for e in run.events for p, s in e.phases.items() if s > 0})
    return [Patch(facecolor=PHASE_COLORS.get(p, OTHER_PHASE_COLOR), label=p) for p in names]


def _note(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, transform=ax.transAxes, ha="center", va="center", fontsize=10,
            color="#666666")
    ax.set_yticks([])

def _secs_short(x: float) -> str:
    return f"{x:.2g} s" if x < 10 else f"{x:.0f} s"
