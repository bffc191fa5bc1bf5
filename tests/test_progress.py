"""The console users see: scaling events (warnings included), failures, evals, and the step
lines (not a terminal) or the progress bar (a terminal)."""

from __future__ import annotations

import io

from elastic_ckpt.config import TrainConfig
from elastic_ckpt.coordinator import FailureNotice, ScalingEvent
from elastic_ckpt.coordinator.coordinator import Progress
from elastic_ckpt.train import EvalMetrics, StepMetrics
from elastic_ckpt.trainer.progress import ProgressPrinter, format_event, format_failure

TRACEBACK = ('Traceback (most recent call last):\n  File "loop.py", line 3, in step\n'
             'RuntimeError: boom\n')


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def _step(step: int, world: int = 2, loss: float = 2.0) -> StepMetrics:
    return StepMetrics(step=step, loss=loss, world_size=world, samples=8, tokens=512, lr=1e-3,
                       step_time_s=0.5, rank=0, sample_ids=())


def _start(resumed: int) -> ScalingEvent:
    return ScalingEvent(kind="start", message="initial start", from_workers=0, to_workers=2,
                        resumed_step=resumed, phases={"actors": 1.0}, total_s=2.0)


def _run(out: io.StringIO) -> ProgressPrinter:
    cfg = TrainConfig(max_steps=10, log_interval_steps=5)
    printer = ProgressPrinter(cfg, out)
    failure = FailureNotice(kind="training_error", message=TRACEBACK, at_step=6, retrying=True)
    recovery = ScalingEvent(kind="failure", message="boom", from_workers=2, to_workers=1,
                            at_step=6, resumed_step=5, phases={"load": 0.5}, total_s=3.0)
    evaluation = EvalMetrics(step=10, loss=1.5, metrics={}, samples=16, world_size=1,
                             eval_time_s=0.25)
    printer(Progress(steps=[_step(s) for s in range(1, 7)], events=[_start(0)], evals=[]))
    printer(Progress(steps=[], events=[recovery], evals=[], failures=[failure]))
    printer(Progress(steps=[_step(s, world=1, loss=1.25) for s in range(6, 11)], events=[],
                     evals=[evaluation]))
    return printer


def test_event_line_has_phases_steps_lost_and_every_warning() -> None:
    event = ScalingEvent(kind="failure", message="node died", from_workers=2, to_workers=1,
                         at_step=12, resumed_step=5, phases={"actors": 2.5, "load": 0.25},
                         total_s=4.0,
                         skipped_checkpoints=[{"step": 10, "error": "checksum mismatch in x"}],
                         warnings=["resuming from step 5 with a changed schedule: max_steps"])
    text = format_event(event)
    first, *warnings = text.splitlines()
    assert first == ("failure: 2 -> 1 workers, resumed from checkpoint step 5, 7 steps lost, "
                     "4.00s total [actors=2.50s load=0.25s]")
    assert warnings == [
        "   WARNING: skipped corrupt checkpoint step 10 (marked CORRUPT): checksum mismatch in x",
        "   WARNING: resuming from step 5 with a changed schedule: max_steps"]
    assert event.to_json()["skipped_checkpoints"][0]["step"] == 10


def test_event_line_says_where_the_group_started() -> None:
    # ``resumed_step`` is the step restored from; 0 when there was no checkpoint.
    assert format_event(_start(0)) == ("start: 0 -> 2 workers, fresh start, 2.00s total "
                                       "[actors=1.00s]")
    assert format_event(_start(40)).startswith("start: 0 -> 2 workers, resumed from checkpoint "
                                               "step 40, 2.00s total")
    early = ScalingEvent(kind="failure", message="x", from_workers=1, to_workers=1, at_step=3,
                         resumed_step=0, total_s=1.0)
    assert format_event(early).startswith(
        "failure: 1 -> 1 workers, restarted from step 0 (no checkpoint), 3 steps lost")


def test_failure_lines_hold_the_whole_message() -> None:
    retry = FailureNotice(kind="training_error", message=TRACEBACK, at_step=12, retrying=True)
    assert format_failure(retry) == ("!! failure at step 12 (training_error), restarting from "
                                     "the latest checkpoint:\n" + TRACEBACK.rstrip())
    fatal = FailureNotice(kind="fatal", message="bad config", at_step=3, retrying=False)
    assert format_failure(fatal) == "!! failure at step 3 (fatal), giving up:\nbad config"


def test_not_a_terminal_prints_lines() -> None:
    out = io.StringIO()
    _run(out).close()
    lines = out.getvalue().splitlines()
    steps = [line.split()[1] for line in lines if line.startswith("step ")]
    assert steps == ["5/10", "10/10"]  # every log_interval_steps, and at max_steps
    assert lines[0] == "-- start: 0 -> 2 workers, fresh start, 2.00s total [actors=1.00s]"
    failure = lines.index("!! failure at step 6 (training_error), restarting from the latest "
                          "checkpoint:")
    assert lines[failure + 1:failure + 4] == TRACEBACK.splitlines()
    assert lines[failure + 4].startswith("-- failure: 2 -> 1 workers, resumed from checkpoint "
                                         "step 5, 1 steps lost")
    assert "world 1" in lines[-2] and "1024 tok/s" in lines[-2]  # 5 x 512 tokens in 2.5 s
    assert lines[-1] == "eval      10  loss 1.5000  (16 samples, 0.25s)"
    assert "\r" not in out.getvalue()  # no bar


def test_a_terminal_gets_a_bar_with_the_lines_above_it() -> None:
    out = _Terminal()
    printer = _run(out)
    text = out.getvalue()
    assert "\r" in text  # the bar redraws in place
    assert "-- start: 0 -> 2 workers, fresh start" in text
    assert "!! failure at step 6 (training_error)" in text and "RuntimeError: boom" in text
    assert "eval      10  loss 1.5000" in text
    assert not any(line.startswith("step ") for line in text.splitlines())  # no step lines
    printer.close()
    printer.close()  # idempotent
    final = out.getvalue().split("\r")[-1]
    assert "10/10" in final and "loss 1.2500" in final and "world 1" in final
    assert "1,024 tok/s" in final and "ETA 00:00" in final
    assert out.getvalue().endswith("\n")


def test_bar_can_be_forced_either_way() -> None:
    plain = io.StringIO()
    printer = ProgressPrinter(TrainConfig(max_steps=10, log_interval_steps=5), plain, bar=True)
    printer(Progress(steps=[_step(1)], events=[], evals=[]))
    printer.close()
    assert "1/10" in plain.getvalue() and "\r" in plain.getvalue()
    lines = _Terminal()
    printer = ProgressPrinter(TrainConfig(max_steps=10, log_interval_steps=1), lines, bar=False)
    printer(Progress(steps=[_step(1)], events=[], evals=[]))
    printer.close()
    assert lines.getvalue().startswith("step      1/10  loss 2.0000")
