"""``elastic-ckpt timeline``: reading a run directory (events.jsonl, metrics.jsonl), the
layout (phase spans, world size, latest loss per step), the text/JSON/PNG outputs and errors;
one ``ray`` test on the run directory of a real training run."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path
from typing import Any

import pytest

from elastic_ckpt.cli import timeline as tl
from elastic_ckpt.cli import timeline_plot as tp
from elastic_ckpt.cli.main import main
from elastic_ckpt.errors import RunDirError

# -- synthetic run directories, written the way a run writes them ------------------------------

T0 = 1_700_000_000.0
START_PHASES = {"placement": 0.01, "actors": 3.5, "rendezvous": 0.004, "build": 0.7,
                "load": 0.0002, "first_step": 0.9}


class RunWriter:
    """Builds a run in time order: ``start``, ``steps``, ``event``, ``failure`` append lines
    and advance the clock ``now`` (unix seconds) the way a real run would."""

    def __init__(self, t0: float = T0, step_s: float = 0.5, ckpt_every: int = 10,
                 eval_every: int = 0) -> None:
        self.now, self.step_s = t0, step_s
        self.ckpt_every, self.eval_every = ckpt_every, eval_every
        self.events: list[dict[str, Any]] = []
        self.metrics: list[dict[str, Any]] = []
        self.step, self.world = 0, 0

    def event(self, kind: str, to: int, phases: dict[str, float], resumed: int | None = None,
              detect: float | None = None, message: str = "") -> dict[str, Any]:
        """One completed event starting now; ``detect`` (if given) lies before its start."""
        if detect is not None:
            phases = {"detect": detect, **phases}
        sequential = sum(s for p, s in phases.items() if p not in ("detect", "save"))
        total = sequential + 0.05  # the coordinator's own gaps between phases
        at_step = None if kind == "start" else self.step
        resumed = self.step if resumed is None else resumed
        record = {"kind": kind, "message": message or f"{kind} {self.world} -> {to}",
                  "from_workers": self.world, "started_unix_s": self.now, "to_workers": to,
                  "at_step": at_step, "resumed_step": resumed, "phases": phases,
                  "total_s": total, "skipped_checkpoints": [], "warnings": [], "details": {},
                  "steps_lost": None if at_step is None else max(0, at_step - resumed)}
        self.events.append(record)
        self.now += total
        self.world, self.step = to, resumed
        return record

    def start(self, to: int) -> dict[str, Any]:
        return self.event("start", to, dict(START_PHASES), resumed=0)

    def steps(self, until: int) -> None:
        while self.step < until:
            self.step += 1
            self.now += self.step_s
            self.metrics.append({
                "type": "step", "time": self.now, "step": self.step,
                "loss": 5.0 / (1 + 0.05 * self.step), "lr": 1e-3, "world_size": self.world,
                "samples": 24, "tokens": 24 * 64, "tokens_per_s": 3000.0,
                "samples_per_s": 48.0, "step_time_s": self.step_s, "metrics": {}})
            if self.eval_every and self.step % self.eval_every == 0:
                self.now += 0.2
                self.metrics.append({"type": "eval", "time": self.now, "step": self.step,
                                     "loss": 5.2 / (1 + 0.05 * self.step), "samples": 64,
                                     "eval_time_s": 0.2, "metrics": {}})
            if self.ckpt_every and self.step % self.ckpt_every == 0:
                self.now += 0.12
                self.metrics.append({"type": "checkpoint", "time": self.now,
                                     "step": self.step, "seconds": 0.12, "bytes": 1 << 20})

    def failure(self, kind: str = "worker_died") -> None:
        self.now += 0.1
        self.metrics.append({"type": "failure", "time": self.now, "at_step": self.step,
                             "kind": kind, "message": "rank 1 died (test)"})

    def last_checkpoint(self) -> int:
        return max(m["step"] for m in self.metrics if m["type"] == "checkpoint")

    def write(self, run_dir: Path, metrics: bool = True) -> Path:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "events.jsonl").write_text(
            "".join(json.dumps(e) + "\n" for e in self.events))
        if metrics:
            (run_dir / "metrics.jsonl").write_text(
                "".join(json.dumps(m) + "\n" for m in self.metrics))
        return run_dir


def elastic_run(eval_every: int = 25) -> RunWriter:
    """Start at 2, a worker dies at step 43 (3 steps lost), capacity for 3 at step 80, a
    drain to 2 at step 120, done at step 150."""
    run = RunWriter(eval_every=eval_every)
    run.start(2)
    run.steps(43)
    run.failure()
    run.now += 0.3
    run.event("failure", 1, {"teardown": 0.05, "placement": 0.01, "actors": 3.0,
                             "rendezvous": 0.3, "build": 0.6, "load": 0.3, "first_step": 0.5},
              resumed=run.last_checkpoint(), detect=0.4, message="rank 1 died (test)")
    run.steps(80)
    run.event("scale_up", 3, {"drain": 0.7, "save": 0.1, "teardown": 0.003, "placement": 1.0,
                              "actors": 5.0, "rendezvous": 0.3, "build": 1.2, "load": 0.4,
                              "first_step": 0.6}, detect=1.0)
    run.steps(120)
    run.event("drain", 2, {"drain": 0.9, "save": 0.15, "teardown": 0.01, "placement": 0.02,
                           "actors": 2.5, "rendezvous": 0.2, "build": 0.9, "load": 0.35,
                           "first_step": 0.5}, detect=0.01)
    run.steps(150)
    return run


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    capsys.readouterr()  # only the command's own output (a run before it prints too)
    code = main(["timeline", *(str(a) for a in argv)])
    out, err = capsys.readouterr()
    return code, out, err


@pytest.fixture
def elastic_dir(tmp_path) -> Path:
    return elastic_run().write(tmp_path / "run")


def event(**fields) -> tl.EventRecord:
    base = {"line": 1, "kind": "scale_up", "message": "", "from_workers": 1, "to_workers": 2,
            "started_unix_s": T0 + 10, "at_step": 5, "resumed_step": 5, "phases": {},
            "total_s": None, "steps_lost": 0}
    return tl.EventRecord(**{**base, **fields})


# -- layout ------------------------------------------------------------------------------------
def test_phase_spans_follow_phases_order_from_the_start():
    # Written in the order the coordinator fills them in (save before drain, load before
    # build); laid out in events.PHASES order.
    e = event(phases={"detect": 1.0, "save": 0.2, "drain": 0.5, "teardown": 0.1,
                      "placement": 1.0, "actors": 2.0, "rendezvous": 0.25, "load": 0.5,
                      "build": 1.0, "first_step": 0.5}, total_s=6.0)
    spans = tl.phase_spans(e, T0)
    assert [s.phase for s in spans] == ["detect", "drain", "save", "teardown", "placement",
                                        "actors", "rendezvous", "build", "load", "first_step"]
    by = {s.phase: s for s in spans}
    assert (by["detect"].start_s, by["detect"].end_s) == (9.0, 10.0)  # timed before the start
    assert (by["drain"].start_s, by["drain"].end_s) == (10.0, 10.5)
    assert (by["save"].start_s, by["save"].end_s) == pytest.approx((10.3, 10.5))
    assert by["save"].within == "drain"
    sequential = [s for s in spans if s.phase not in ("detect", "save")]
    for prev, nxt in zip(sequential, sequential[1:]):
        assert nxt.start_s == pytest.approx(prev.end_s)
    assert (by["build"].start_s, by["load"].start_s) == pytest.approx((13.85, 14.85))
    assert sequential[-1].end_s == pytest.approx(15.85)


def test_phase_spans_of_a_start_and_unknown_phases():
    e = event(kind="start", from_workers=0, phases={"actors": 2.0, "placement": 0.5,
                                                    "warmup": 1.0, "save": 0.3})
    spans = tl.phase_spans(e, T0)
    # no drain: save is an ordinary phase; a name events.PHASES does not know goes last
    assert [(s.phase, s.start_s, s.end_s) for s in spans] == [
        ("save", 10.0, 10.3), ("placement", 10.3, 10.8), ("actors", 10.8, 12.8),
        ("warmup", 12.8, 13.8)]


def test_drawn_spans_give_short_phases_a_minimum_width_and_keep_the_event_length():
    e = event(phases={"detect": 0.001, "drain": 0.5, "save": 0.001, "teardown": 0.0,
                      "placement": 0.001, "actors": 5.0, "rendezvous": 0.002,
                      "first_step": 1.0})
    bars = tl.drawn_spans(tl.phase_spans(e, T0), min_width=0.2)
    by = {phase: (x, w) for phase, x, w in bars}
    assert "teardown" not in by  # zero seconds: nothing to draw
    assert all(w >= 0.2 - 1e-12 for _, _, w in bars)
    assert by["detect"] == pytest.approx((9.8, 0.2))  # grows to the left of the start
    assert by["save"] == pytest.approx((10.3, 0.2))  # inside drain, at its end
    sequential = [b for b in bars if b[0] not in ("detect", "save")]
    for (_, x0, w0), (_, x1, _) in zip(sequential, sequential[1:]):
        assert x1 == pytest.approx(x0 + w0)
    last = sequential[-1]
    assert last[1] + last[2] == pytest.approx(10 + 0.5 + 0.001 + 5.0 + 0.002 + 1.0)


def test_world_size_steps_from_events(elastic_dir):
    run = tl.read_run(str(elastic_dir))
    t0 = tl.run_start(run)
    start, failure, scale_up, drain = run.events
    points = tl.world_size_steps(run.events, t0, tl.run_end(run))
    assert [n for _, n in points] == [0, 2, 0, 1, 3, 2, 2]
    times = [t for t, _ in points]
    assert times[:6] == pytest.approx([
        0.0, start.end_unix_s - t0, failure.started_unix_s - t0, failure.end_unix_s - t0,
        scale_up.end_unix_s - t0, drain.end_unix_s - t0])
    assert times[-1] == pytest.approx(run.checkpoints[-1].time - t0)  # the last record
    # the step records agree with the step function wherever a step completed
    for r in tl.latest_per_step(run.steps):
        size = next(n for t, n in reversed(points) if t <= r.time - t0 + 1e-9)
        assert size == r.world_size, r.step


def test_latest_per_step_keeps_the_rerun_steps(elastic_dir):
    run = tl.read_run(str(elastic_dir))
    assert [r.step for r in run.steps].count(41) == 2  # run at 2 workers, lost, re-run at 1
    latest = tl.latest_per_step(run.steps)
    assert [r.step for r in latest] == list(range(1, 151))
    by_step = {r.step: r for r in latest}
    assert [by_step[s].world_size for s in (40, 41, 43, 44)] == [2, 1, 1, 1]
    assert by_step[41].time > max(r.time for r in run.failures)


def test_loss_line_breaks_at_events(elastic_dir):
    run = tl.read_run(str(elastic_dir))
    xs, ys = tl.loss_segments(tl.latest_per_step(run.steps), run.events, tl.run_start(run))
    assert sum(math.isnan(y) for y in ys) == 3  # failure, scale_up, drain
    assert len(xs) == len(ys) == 150 + 3
    # a step that completed while its group drained stands alone
    steps = [tl.StepRecord(T0 + t, n, 1.0, 1) for n, t in ((1, 8.0), (2, 10.5), (3, 20.0))]
    xs, _ = tl.loss_segments(steps, [event(total_s=5.0)], T0)  # the event: 10 s to 15 s
    assert [x if not math.isnan(x) else None for x in xs] == [8.0, None, 10.5, None, 20.0]


def test_int_ticks():
    assert tp.int_ticks(1) == [0, 1]
    assert tp.int_ticks(3) == [0, 1, 2, 3]
    assert tp.int_ticks(16) == [0, 4, 8, 12, 16]
    assert tp.int_ticks(13) == [0, 4, 8, 13]
    assert tp.int_ticks(64)[-1] == 64 and len(tp.int_ticks(64)) <= 7


# -- reading and its errors --------------------------------------------------------------------
def test_reads_events_and_metrics(elastic_dir):
    run = tl.read_run(str(elastic_dir))
    assert [e.kind for e in run.events] == ["start", "failure", "scale_up", "drain"]
    assert run.has_metrics and not run.warnings
    assert (len(run.checkpoints), len(run.evals), len(run.failures)) == (15, 6, 1)
    assert run.events[1].steps_lost == 3 and run.events[1].resumed_step == 40
    assert run.failures[0].kind == "worker_died" and run.failures[0].at_step == 43


def test_truncated_last_lines_are_skipped_with_a_warning(elastic_dir, capsys):
    metrics = elastic_dir / "metrics.jsonl"
    n_lines = len(metrics.read_text().splitlines())
    with open(metrics, "a") as f:
        f.write('{"type": "step", "time": 1700000999.5, "st')  # killed mid-write
    with open(elastic_dir / "events.jsonl", "a") as f:
        f.write('{"kind": "scale_up", "mess')
    run = tl.read_run(str(elastic_dir))
    assert len(run.events) == 4 and len(run.steps) == 153
    assert len(run.warnings) == 2
    assert f"metrics.jsonl line {n_lines + 1}: skipped a truncated last line" in run.warnings[1]
    assert "events.jsonl line 5" in run.warnings[0]
    code, out, err = run_cli(capsys, elastic_dir, "--text")
    assert code == 0 and "150 steps" in out
    assert err.count("elastic-ckpt timeline: warning:") == 2


@pytest.mark.parametrize("bad", ['{"type": "step", "time": 1.0, "st', "not json", "[1, 2]"])
def test_malformed_middle_line_is_an_error_naming_file_and_line(elastic_dir, capsys, bad):
    metrics = elastic_dir / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    lines[6] = bad
    metrics.write_text("\n".join(lines) + "\n")
    with pytest.raises(RunDirError) as info:
        tl.read_run(str(elastic_dir))
    assert info.value.line == 7 and info.value.path == str(metrics)
    code, out, err = run_cli(capsys, elastic_dir, "--text")
    assert code == 1 and out == ""
    assert err.startswith(f"elastic-ckpt timeline: error: {metrics} line 7: ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_field_of_the_wrong_type_is_named(elastic_dir, capsys):
    events = elastic_dir / "events.jsonl"
    lines = events.read_text().splitlines()
    second = json.loads(lines[1])
    second["from_workers"] = "two"
    lines[1] = json.dumps(second)
    events.write_text("\n".join(lines) + "\n")
    code, out, err = run_cli(capsys, elastic_dir, "--json")
    assert code == 1
    assert f"{events} line 2: field 'from_workers' must be int" in err
    error = json.loads(out)["error"]
    assert error["type"] == "RunDirError" and error["line"] == 2
    assert error["field"] == "from_workers"


def test_missing_run_dir_and_missing_events(tmp_path, capsys):
    code, _, err = run_cli(capsys, tmp_path / "nope", "--text")
    assert code == 1 and "is not a directory" in err and len(err.splitlines()) == 1
    (tmp_path / "empty").mkdir()
    code, _, err = run_cli(capsys, tmp_path / "empty")
    assert code == 1 and "has no events.jsonl" in err and len(err.splitlines()) == 1
    (tmp_path / "empty" / "events.jsonl").write_text("")
    code, _, err = run_cli(capsys, tmp_path / "empty")
    assert code == 1 and "holds no events" in err and len(err.splitlines()) == 1


def test_unknown_metric_types_are_ignored(elastic_dir):
    with open(elastic_dir / "metrics.jsonl", "a") as f:
        f.write(json.dumps({"type": "memory", "time": T0 + 1, "gib": 3.0}) + "\n")
    assert len(tl.read_run(str(elastic_dir)).steps) == 153


# -- the command -------------------------------------------------------------------------------
def test_text_table_and_summary(elastic_dir, capsys):
    code, out, err = run_cli(capsys, elastic_dir, "--text")
    assert code == 0 and err == ""
    lines = out.splitlines()
    header = next(line for line in lines if line.lstrip().startswith("T+S"))
    assert header.split()[:7] == ["T+S", "KIND", "WORKERS", "AT_STEP", "RESUMED", "LOST",
                                  "TOTAL_S"]
    assert header.split()[7:] == ["detect", "drain", "save", "teardown", "placement",
                                  "actors", "rendezvous", "build", "load", "first_step"]
    rows = [line.split() for line in lines[lines.index(header) + 1:] if line.strip()][:4]
    assert [r[1:6] for r in rows] == [["start", "0->2", "-", "0", "-"],
                                      ["failure", "2->1", "43", "40", "3"],
                                      ["scale_up", "1->3", "80", "80", "0"],
                                      ["drain", "3->2", "120", "120", "0"]]
    assert rows[0][0] == "0.0" and rows[1][7] == "0.40"  # T+S, the failure's detect
    summary = next(line for line in lines if line.startswith("summary:"))
    for part in ("4 events", "150 steps (3 re-run after recovery)",
                 "15 checkpoints (median save 0.12 s)", "1 failure(s)", "3 steps lost",
                 f"final loss {5.0 / (1 + 0.05 * 150):.4f}", "final eval loss"):
        assert part in summary, part


def test_json_output(elastic_dir, capsys):
    code, out, _ = run_cli(capsys, elastic_dir, "--json")
    assert code == 0
    view = json.loads(out)
    assert view["ok"] and view["has_metrics"] and "png" not in view
    assert not (elastic_dir / tl.DEFAULT_PNG).exists()
    s = view["summary"]
    assert (s["final_step"], s["checkpoints"], s["median_checkpoint_s"], s["failures"],
            s["steps_rerun"], s["steps_lost"]) == (150, 15, 0.12, 1, 3, 3)
    assert s["final_loss"] == pytest.approx(5.0 / (1 + 0.05 * 150))
    failure = view["events"][1]
    assert (failure["kind"], failure["at_step"], failure["resumed_step"],
            failure["steps_lost"]) == ("failure", 43, 40, 3)
    assert [sp["phase"] for sp in failure["spans"]][:2] == ["detect", "teardown"]
    assert failure["spans"][0]["end_s"] == pytest.approx(failure["offset_s"], abs=1e-3)
    assert [n for _, n in view["world_size"]] == [0, 2, 0, 1, 3, 2, 2]


def test_events_only_run_dir(elastic_dir, capsys, tmp_path):
    (elastic_dir / "metrics.jsonl").unlink()
    code, out, _ = run_cli(capsys, elastic_dir, "--text")
    assert code == 0 and "no metrics.jsonl" in out and "1 failure event(s)" in out
    code, out, _ = run_cli(capsys, elastic_dir, "--json")
    s = json.loads(out)["summary"]
    assert s["final_step"] is None and s["checkpoints"] is None and s["failures"] == 1
    png = tmp_path / "events-only.png"
    code, out, _ = run_cli(capsys, elastic_dir, "--out", png)
    assert code == 0 and out.strip() == str(png)
    assert_png(png)


def assert_png(path: Path, min_kib: int = 20) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(data) > min_kib * 1024


def test_out_writes_a_png_and_text_still_prints(elastic_dir, capsys, tmp_path):
    png = tmp_path / "pictures" / "t.png"
    png.parent.mkdir()
    code, out, _ = run_cli(capsys, elastic_dir, "--out", png, "--text")
    assert code == 0 and "summary:" in out and out.strip().endswith(str(png))
    assert_png(png)
    code, out, _ = run_cli(capsys, elastic_dir, "--out", png, "--json")
    assert json.loads(out)["png"] == str(png)


def test_default_writes_timeline_png_in_the_run_dir(elastic_dir, capsys):
    code, out, _ = run_cli(capsys, elastic_dir)
    png = elastic_dir / tl.DEFAULT_PNG
    assert code == 0 and out.strip() == str(png)
    assert_png(png)


def test_unwritable_out_is_one_error_line(elastic_dir, capsys, tmp_path):
    code, _, err = run_cli(capsys, elastic_dir, "--out", tmp_path / "no" / "such" / "x.png")
    assert code == 1 and err.startswith("elastic-ckpt timeline: error: cannot write ")
    assert len(err.splitlines()) == 1


def test_without_matplotlib_the_png_is_one_error_line(elastic_dir, capsys, monkeypatch):
    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    code, out, err = run_cli(capsys, elastic_dir, "--out", elastic_dir / "x.png")
    assert code == 1 and out == ""
    assert err == ("elastic-ckpt timeline: error: --out needs matplotlib: pip install "
                   "matplotlib (or elastic_ckpt[plot])\n")
    code, out, _ = run_cli(capsys, elastic_dir, "--text")  # the table needs no matplotlib
    assert code == 0 and "summary:" in out


def test_help_states_the_default(capsys):
    code = main(["timeline", "--help"])
    out = capsys.readouterr().out
    assert code == 0 and "RUN_DIR/timeline.png" in " ".join(out.split())


# -- a real run --------------------------------------------------------------------------------
@pytest.mark.ray
@pytest.mark.timeout(120)
def test_timeline_of_a_real_run(tmp_path, capsys):
    from ray_jobs import Faults, loopback_cluster, tiny_config, trainer_kwargs

    from elastic_ckpt import ElasticTrainer

    config = tiny_config(tmp_path, max_steps=12)  # checkpoints at steps 4, 8 and 12
    with loopback_cluster(num_nodes=1):
        ElasticTrainer(**trainer_kwargs(config, Faults(tmp_path / "faults"))).fit()
    run_dir = Path(config.run_dir)
    code, out, err = run_cli(capsys, run_dir, "--json")
    assert code == 0, err
    view = json.loads(out)
    (start,) = view["events"]
    assert (start["kind"], start["from_workers"], start["to_workers"]) == ("start", 0, 1)
    phases = [sp["phase"] for sp in start["spans"]]
    assert phases[0] == "placement" and phases.index("build") < phases.index("load")
    assert start["spans"][-1]["end_s"] <= start["total_s"] + 1e-3
    assert [n for _, n in view["world_size"]][:2] == [0, 1]
    assert view["has_metrics"]
    s = view["summary"]
    assert s["final_step"] == 12 and s["checkpoints"] >= 3 and s["failures"] == 0
    code, out, _ = run_cli(capsys, run_dir, "--out", tmp_path / "real.png")
    assert code == 0
    assert_png(tmp_path / "real.png")
