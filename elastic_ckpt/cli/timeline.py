"""``elastic-ckpt timeline RUN_DIR``: a run's scaling events, world size and loss over time.

Reads the run directory contract: ``events.jsonl`` (one ``ScalingEvent`` per line, required)
and ``metrics.jsonl`` (step, eval, checkpoint and failure records, optional). Reading and
layout are pure functions over typed records; ``timeline_plot.render_png`` draws the picture
with matplotlib.

A last line that does not parse is skipped with a warning (a run killed mid-write, or one
still writing); a malformed line anywhere else is an error naming the file and line.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
from typing import Any, Iterable

from elastic_ckpt.cli.views import table
from elastic_ckpt.errors import RunDirError

EVENTS_FILE = "events.jsonl"
METRICS_FILE = "metrics.jsonl"
DEFAULT_PNG = "timeline.png"


# -- records -----------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class EventRecord:
    """One line of ``events.jsonl`` (``ScalingEvent.to_json()``)."""

    line: int
    kind: str
    message: str
    from_workers: int
    to_workers: int | None
    started_unix_s: float
    at_step: int | None
    resumed_step: int | None
    phases: dict[str, float]
    total_s: float | None
    steps_lost: int | None
    warnings: tuple[str, ...] = ()

    @property
    def end_unix_s(self) -> float:
        """When the event completed (the first step at the new size was seen)."""
        seconds = self.total_s if self.total_s is not None else sum(self.phases.values())
        return self.started_unix_s + seconds


@dataclasses.dataclass(frozen=True)
class StepRecord:
    time: float
    step: int
    loss: float
    world_size: int
    lr: float | None = None
    step_time_s: float | None = None


@dataclasses.dataclass(frozen=True)
class EvalRecord:
    time: float
    step: int
    loss: float


@dataclasses.dataclass(frozen=True)
class CheckpointRecord:
    time: float
    step: int
    seconds: float
    bytes: int | None = None


@dataclasses.dataclass(frozen=True)
class FailureRecord:
    time: float
    at_step: int | None
    kind: str
    message: str = ""


@dataclasses.dataclass(frozen=True)
class RunRecords:
    """Everything read from one run directory, in file order."""

    run_dir: str
    events: tuple[EventRecord, ...]
    has_metrics: bool
    steps: tuple[StepRecord, ...] = ()
    evals: tuple[EvalRecord, ...] = ()
    checkpoints: tuple[CheckpointRecord, ...] = ()
    failures: tuple[FailureRecord, ...] = ()
    warnings: tuple[str, ...] = ()


# -- reading -----------------------------------------------------------------------------------
def read_run(run_dir: str) -> RunRecords:
    """Parse ``run_dir``'s ``events.jsonl`` and, when present, ``metrics.jsonl``."""
    run_dir = os.path.abspath(run_dir)
    if not os.path.isdir(run_dir):
        raise RunDirError(f"{run_dir} is not a directory; pass a training run's run_dir "
                          "(config run_dir, default ./runs/latest)", path=run_dir)
    events_path = os.path.join(run_dir, EVENTS_FILE)
    if not os.path.isfile(events_path):
        raise RunDirError(f"{run_dir} has no {EVENTS_FILE}: not a run_dir, or a run that has "
                          "not finished starting (the coordinator writes a line per scaling "
                          "event, the first once training starts)", path=events_path)
    warnings: list[str] = []
    events = [parse_event(obj, events_path, n)
              for n, obj in read_jsonl(events_path, warnings)]
    events.sort(key=lambda e: e.started_unix_s)
    metrics_path = os.path.join(run_dir, METRICS_FILE)
    kinds: dict[str, list] = {"step": [], "eval": [], "checkpoint": [], "failure": []}
    has_metrics = os.path.isfile(metrics_path)
    for n, obj in read_jsonl(metrics_path, warnings) if has_metrics else ():
        record = parse_metric(obj, metrics_path, n)
        if record is not None:
            kinds[obj["type"]].append(record)
    if not events and not any(kinds.values()):
        raise RunDirError(f"{events_path} holds no events (and there are no metrics): the run "
                          "has not finished starting", path=events_path)
    return RunRecords(run_dir, tuple(events), has_metrics, tuple(kinds["step"]),
                      tuple(kinds["eval"]), tuple(kinds["checkpoint"]), tuple(kinds["failure"]),
                      tuple(warnings))


def read_jsonl(path: str, warnings: list[str]) -> list[tuple[int, dict[str, Any]]]:
    """``(line number, object)`` per non-blank line. A last line that is not JSON is skipped
    with a warning appended to ``warnings``; any other malformed line raises ``RunDirError``."""
    try:
        with open(path, "rb") as f:
            lines = f.read().split(b"\n")
    except OSError as exc:
        raise RunDirError(f"cannot read {path}: {exc}", path=path) from None
    numbered = [(n, raw) for n, raw in enumerate(lines, 1) if raw.strip()]
    out = []
    for i, (n, raw) in enumerate(numbered):
        try:
            obj = json.loads(raw)
        except ValueError as exc:  # JSONDecodeError and UnicodeDecodeError
            if i == len(numbered) - 1:
                warnings.append(f"{path} line {n}: skipped a truncated last line (a run killed "
                                f"mid-write, or still writing): {exc}")
                continue
            raise RunDirError(f"{path} line {n}: not valid JSON ({exc}); only a truncated last "
                              "line is skipped", path=path, line=n) from None
        if not isinstance(obj, dict):
            raise RunDirError(f"{path} line {n}: expected a JSON object, got "
                              f"{type(obj).__name__}", path=path, line=n)
        out.append((n, obj))
    return out


class _Fields:
    """Typed access to one JSON line's fields; errors name the file, line and field."""

    def __init__(self, obj: dict[str, Any], path: str, line: int) -> None:
        self.obj, self.path, self.line = obj, path, line

    def fail(self, name: str, what: str) -> RunDirError:
        return RunDirError(f"{self.path} line {self.line}: field {name!r} {what}",
                           path=self.path, line=self.line, field=name)

    def get(self, name: str, kind: type | tuple[type, ...], optional: bool = False) -> Any:
        if name not in self.obj or self.obj[name] is None:
            if optional:
                return None
            raise self.fail(name, "is missing")
        value = self.obj[name]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if float in kinds:
            kinds = (*kinds, int)
        if isinstance(value, bool) or not isinstance(value, kinds):
            raise self.fail(name, f"must be {'/'.join(k.__name__ for k in kinds)}, got "
                                  f"{json.dumps(value)[:40]}")
        return float(value) if float in kinds else value


def parse_event(obj: dict[str, Any], path: str, line: int) -> EventRecord:
    f = _Fields(obj, path, line)
    phases = f.get("phases", dict, optional=True) or {}
    for name, seconds in phases.items():
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)):
            raise f.fail("phases", f"must map names to seconds; {name!r} is {seconds!r}")
    return EventRecord(
        line=line, kind=f.get("kind", str), message=f.get("message", str, optional=True) or "",
        from_workers=f.get("from_workers", int), to_workers=f.get("to_workers", int, True),
        started_unix_s=f.get("started_unix_s", float), at_step=f.get("at_step", int, True),
        resumed_step=f.get("resumed_step", int, True),
        phases={k: float(v) for k, v in phases.items()},
        total_s=f.get("total_s", float, True), steps_lost=f.get("steps_lost", int, True),
        warnings=tuple(str(w) for w in f.get("warnings", list, True) or ()))


def parse_metric(obj: dict[str, Any], path: str, line: int) -> Any:
    """One ``metrics.jsonl`` record, or None for a ``type`` this reader does not know."""
    f = _Fields(obj, path, line)
    kind, time = f.get("type", str), f.get("time", float)
    if kind == "step":
        return StepRecord(time, f.get("step", int), f.get("loss", float),
                          f.get("world_size", int), f.get("lr", float, True),
                          f.get("step_time_s", float, True))
    if kind == "eval":
        return EvalRecord(time, f.get("step", int), f.get("loss", float))
    if kind == "checkpoint":
        return CheckpointRecord(time, f.get("step", int), f.get("seconds", float),
                                f.get("bytes", int, True))
    if kind == "failure":
        return FailureRecord(time, f.get("at_step", int, True), f.get("kind", str),
                             f.get("message", str, True) or "")
    return None


# -- layout ------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class Span:
    """One phase of one event, in seconds since the run's first record. ``within`` names the
    phase this one is part of (``save`` is the tail of ``drain``), else None."""

    phase: str
    start_s: float
    end_s: float
    within: str | None = None

    @property
    def seconds(self) -> float:
        return self.end_s - self.start_s


BEFORE_START = "detect"
"""Timed up to the event's creation (capacity seen / last healthy poll -> decision): it ends
at ``started_unix_s`` and is not part of ``total_s``."""
NESTED = {"save": "drain"}
"""The stop checkpoint is saved while the ranks drain: ``drain`` includes ``save``."""


def phase_order(phases: Iterable[str]) -> list[str]:
    """``Phase`` order; names it does not know (a newer writer) go last, as given."""
    from elastic_ckpt.train.events import Phase  # noqa: PLC0415 - torch, only when drawing

    names, order = list(phases), [p.value for p in Phase]
    return [p for p in order if p in names] + [p for p in names if p not in order]


def phase_spans(event: EventRecord, t0: float) -> list[Span]:
    """The event's phases in ``Phase`` order, each starting where the previous one
    ended, the first at ``started_unix_s``; except ``detect``, which ends there (it is timed
    before the event is created), and ``save``, drawn as the tail of ``drain`` (which
    includes it) when the event has a drain."""
    start = event.started_unix_s - t0
    spans, at = [], start
    for name in phase_order(event.phases):
        seconds = max(0.0, event.phases[name])
        parent = NESTED.get(name)
        if name == BEFORE_START:
            spans.append(Span(name, start - seconds, start))
        elif parent is not None and parent in event.phases:
            continue  # placed below, once its parent is
        else:
            spans.append(Span(name, at, at + seconds))
            at += seconds
    for name, parent in NESTED.items():
        if name in event.phases and parent in event.phases:
            outer = next(s for s in spans if s.phase == parent)
            seconds = min(max(0.0, event.phases[name]), outer.seconds)
            spans.insert(spans.index(outer) + 1, Span(name, outer.end_s - seconds, outer.end_s,
                                                      within=parent))
    return spans


def drawn_spans(spans: list[Span], min_width: float) -> list[tuple[str, float, float]]:
    """``(phase, x, width)`` to draw, so that every phase can be seen: phases of zero seconds
    are left out, every other one is at least ``min_width`` wide. The width the short ones
    gain is taken from the longest phase, so the event keeps its length and stays in line with
    the world-size step (when the event is too short for that, the later phases are pushed
    right). ``detect`` grows to the left; a nested phase (``save``) stays inside its parent's
    bar, at its end. The text and JSON outputs keep the exact seconds."""
    sequence = [s for s in spans if s.within is None and s.phase != BEFORE_START
                and s.seconds > 0]
    widths = {s.phase: max(s.seconds, min_width) for s in sequence}
    excess = sum(widths.values()) - sum(s.seconds for s in sequence)
    if sequence and excess > 0:
        longest = max(sequence, key=lambda s: s.seconds).phase
        widths[longest] = max(widths[longest] - excess, min_width)
    drawn: dict[str, tuple[float, float]] = {}
    at: float | None = None
    for span in spans:
        if span.within is not None or span.seconds <= 0:
            continue
        if span.phase == BEFORE_START:
            width = max(span.seconds, min_width)
            drawn[span.phase] = (span.end_s - width, width)
            continue
        x = span.start_s if at is None else at
        at = x + widths[span.phase]
        drawn[span.phase] = (x, widths[span.phase])
    out: list[tuple[str, float, float]] = []
    for span in spans:
        if span.phase in drawn:
            out.append((span.phase, *drawn[span.phase]))
        elif span.within in drawn and span.seconds > 0:
            x, width = drawn[span.within]
            inner = min(max(span.seconds, min_width), width)
            out.append((span.phase, x + width - inner, inner))
    return out


def run_start(run: RunRecords) -> float:
    """Unix time of the run's first record (event start or metrics line)."""
    times = [e.started_unix_s - max(0.0, e.phases.get(BEFORE_START, 0.0)) for e in run.events]
    times += _metric_times(run)
    return min(times) if times else 0.0


def run_end(run: RunRecords) -> float:
    """Unix time of the run's last record (event completion or metrics line)."""
    times = [e.end_unix_s for e in run.events] + _metric_times(run)
    return max(times) if times else 0.0


def _metric_times(run: RunRecords) -> list[float]:
    return [r.time for group in (run.steps, run.evals, run.checkpoints, run.failures)
            for r in group]


def world_size_steps(events: Iterable[EventRecord], t0: float,
                     t_end: float | None = None) -> list[tuple[float, int]]:
    """The world size as a step function: ``(seconds since t0, workers from then on)``. 0
    before the first group trains; each event's ``to_workers`` from its completion; 0 from a
    failure's start until its new group trains. Ends with a point at ``t_end`` when given."""
    changes: list[tuple[float, int, int]] = [(0.0, 0, 0)]
    for i, e in enumerate(sorted(events, key=lambda e: e.started_unix_s)):
        if e.kind == "failure":
            changes.append((e.started_unix_s - t0, 2 * i + 1, 0))
        if e.to_workers is not None:
            changes.append((e.end_unix_s - t0, 2 * i + 2, e.to_workers))
    changes.sort()
    points: list[tuple[float, int]] = []
    for t, _, size in changes:
        if points and points[-1][0] == t:
            points[-1] = (t, size)
        elif not points or points[-1][1] != size:
            points.append((t, size))
    if t_end is not None:
        end = t_end - t0
        if end > points[-1][0]:
            points.append((end, points[-1][1]))
    return points


def latest_per_step(records: Iterable[Any]) -> list[Any]:
    """One record per step, the latest by time (ties: later in the file), ascending by step:
    steps re-run after a recovery replace the ones the failure lost."""
    latest: dict[int, Any] = {}
    for r in records:
        if r.step not in latest or r.time >= latest[r.step].time:
            latest[r.step] = r
    return [latest[s] for s in sorted(latest)]


def loss_segments(steps: list[StepRecord], events: Iterable[EventRecord],
                  t0: float) -> tuple[list[float], list[float]]:
    """The loss curve's x (seconds since t0) and y, with a NaN (a break in the line) between
    two consecutive steps whose interval overlaps a scaling event: the line does not pretend
    training went on through a restart."""
    spans = [(e.started_unix_s, e.end_unix_s) for e in events]
    xs: list[float] = []
    ys: list[float] = []
    for prev, r in zip([None, *steps], steps):
        if prev is not None and any(a < r.time and b > prev.time for a, b in spans):
            xs.append(math.nan)
            ys.append(math.nan)
        xs.append(r.time - t0)
        ys.append(r.loss)
    return xs, ys


# -- the view: JSON for --json, the text table for --text -----------------------------------------
def timeline_view(run: RunRecords) -> dict[str, Any]:
    t0, t1 = run_start(run), run_end(run)
    events = []
    for e in run.events:
        events.append({
            "offset_s": round(e.started_unix_s - t0, 3), "kind": e.kind,
            "from_workers": e.from_workers, "to_workers": e.to_workers, "at_step": e.at_step,
            "resumed_step": e.resumed_step, "steps_lost": e.steps_lost,
            "total_s": None if e.total_s is None else round(e.total_s, 4),
            "phases": {name: round(e.phases[name], 4) for name in phase_order(e.phases)},
            "spans": [{"phase": s.phase, "start_s": round(s.start_s, 4),
                       "end_s": round(s.end_s, 4)} for s in phase_spans(e, t0)],
            "message": e.message, "warnings": list(e.warnings), "line": e.line})
    return {"ok": True, "run_dir": run.run_dir, "start_unix_s": t0,
            "start": _iso(t0), "has_metrics": run.has_metrics, "events": events,
            "world_size": [[round(t, 4), n] for t, n in world_size_steps(run.events, t0, t1)],
            "summary": summary(run), "warnings": list(run.warnings)}


def summary(run: RunRecords) -> dict[str, Any]:
    t0, t1 = run_start(run), run_end(run)
    steps = latest_per_step(run.steps)
    evals = latest_per_step(run.evals)
    saves = [c.seconds for c in run.checkpoints]
    if run.has_metrics:
        failures = len(run.failures)
    else:
        failures = sum(e.kind == "failure" for e in run.events)
    return {
        "total_s": round(t1 - t0, 3),
        "events": len(run.events),
        "final_step": steps[-1].step if steps else None,
        "step_records": len(run.steps),
        "steps_rerun": len(run.steps) - len(steps),
        "steps_lost": sum(e.steps_lost or 0 for e in run.events),
        "checkpoints": len(run.checkpoints) if run.has_metrics else None,
        "median_checkpoint_s": round(statistics.median(saves), 4) if saves else None,
        "failures": failures,
        "final_loss": _finite(steps[-1].loss) if steps else None,
        "final_eval_loss": _finite(evals[-1].loss) if evals else None,
    }


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None  # JSON has no NaN


def format_timeline(view: dict[str, Any]) -> str:
    events = view["events"]
    names = phase_order({p for e in events for p in e["phases"]})
    rows = [("T+S", "KIND", "WORKERS", "AT_STEP", "RESUMED", "LOST", "TOTAL_S", *names)]
    for e in events:
        rows.append((f"{e['offset_s']:.1f}", e["kind"], f"{e['from_workers']}->"
                     f"{_dash(e['to_workers'])}", _dash(e["at_step"]), _dash(e["resumed_step"]),
                     _dash(e["steps_lost"]), _secs(e["total_s"]),
                     *(_secs(e["phases"].get(p)) for p in names)))
    lines = [f"timeline of {view['run_dir']} (T+S: seconds since {view['start']})"]
    lines.append(table(rows, right={0, 3, 4, 5, 6, *range(7, 7 + len(names))})
                 if events else "no scaling events")
    lines.append("")
    lines.append("summary: " + "; ".join(_summary_parts(view)))
    for w in (w for e in events for w in e["warnings"]):
        lines.append(f"event warning: {w}")
    return "\n".join(lines)


def _summary_parts(view: dict[str, Any]) -> list[str]:
    s = view["summary"]
    parts = [f"{s['events']} events over {_duration(s['total_s'])}"]
    if not view["has_metrics"]:
        parts.append(f"no {METRICS_FILE} (steps, loss and checkpoints unknown)")
        parts.append(f"{s['failures']} failure event(s)")
        if s["steps_lost"]:
            parts.append(f"{s['steps_lost']} steps lost")
        return parts
    steps = "no steps" if s["final_step"] is None else f"{s['final_step']} steps"
    if s["steps_rerun"]:
        steps += f" ({s['steps_rerun']} re-run after recovery)"
    parts.append(steps)
    median = s["median_checkpoint_s"]
    parts.append(f"{s['checkpoints']} checkpoints" +
                 (f" (median save {median:.2f} s)" if median is not None else ""))
    parts.append(f"{s['failures']} failure(s)")
    if s["steps_lost"]:
        parts.append(f"{s['steps_lost']} steps lost")
    if s["final_loss"] is not None:
        parts.append(f"final loss {s['final_loss']:.4f}")
    if s["final_eval_loss"] is not None:
        parts.append(f"final eval loss {s['final_eval_loss']:.4f}")
    return parts


def _dash(x: Any) -> str:
    return "-" if x is None else str(x)


def _secs(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"



def _iso(unix_s: float) -> str:
    return datetime.datetime.fromtimestamp(unix_s).astimezone().isoformat(timespec="seconds")


# -- the command -------------------------------------------------------------------------------
def add_parser(sub: Any) -> None:
    p = sub.add_parser(
        "timeline", help="draw a run's scaling events, world size and loss over time",
        description="Read RUN_DIR/events.jsonl (required) and RUN_DIR/metrics.jsonl (if "
                    "present) and draw the run: world size over time with each scaling "
                    "event's phases as coloured spans, and the loss curve with eval losses, "
                    "checkpoints and failures. With neither --out, --text nor --json it "
                    f"writes RUN_DIR/{DEFAULT_PNG} and prints its path.",
        epilog="A truncated last line (a run killed mid-write, or still writing) is skipped "
               "with a warning; any other malformed line is an error (exit 1) naming the file "
               "and line. The PNG needs matplotlib; --text and --json do not.")
    p.add_argument("run_dir", metavar="RUN_DIR", help="a training run's run_dir (config "
                                                      "run_dir, default ./runs/latest)")
    p.add_argument("--out", metavar="PNG", default=None,
                   help=f"write the picture to PNG (default: RUN_DIR/{DEFAULT_PNG} when "
                        "neither --text nor --json is given)")
    p.add_argument("--text", action="store_true",
                   help="print a table (one row per event: offset, kind, workers, steps, "
                        "seconds per phase) and a summary")
    p.add_argument("--json", action="store_true",
                   help="print the --text content as one JSON document instead (with "
                        "\"png\" when --out is given)")
    p.set_defaults(func=cmd_timeline)


def cmd_timeline(args: argparse.Namespace) -> tuple[dict[str, Any], str]:
    run = read_run(args.run_dir)
    for warning in run.warnings:
        print(f"elastic-ckpt timeline: warning: {warning}", file=sys.stderr)
    view = timeline_view(run)
    out = args.out
    if out is None and not args.text and not args.json:
        out = os.path.join(run.run_dir, DEFAULT_PNG)
    texts = []
    if args.text or args.json:
        texts.append(format_timeline(view))
    if out is not None:
        from elastic_ckpt.cli.timeline_plot import render_png  # noqa: PLC0415 - matplotlib

        view["png"] = render_png(run, out)
        texts.append(view["png"])
    return view, "\n".join(texts)
