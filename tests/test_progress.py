"""The console lines users see for scaling events, warnings included."""

from __future__ import annotations

from elastic_ckpt.coordinator import ScalingEvent
from elastic_ckpt.trainer.progress import format_event


def test_event_line_has_phases_steps_lost_and_every_warning() -> None:
    event = ScalingEvent(kind="failure", message="node died", from_workers=2, to_workers=1,
                         at_step=12, resumed_step=5, phases={"actors": 2.5, "load": 0.25},
                         total_s=4.0,
                         skipped_checkpoints=[{"step": 10, "error": "checksum mismatch in x"}],
                         warnings=["resuming from step 5 with a changed schedule: max_steps"])
    text = format_event(event)
    first, *warnings = text.splitlines()
    assert first == ("failure: 2 -> 1 workers, 7 steps lost, 4.00s total "
                     "[actors=2.50s load=0.25s]")
    assert warnings == [
        "   WARNING: skipped corrupt checkpoint step 10 (marked CORRUPT): checksum mismatch in x",
        "   WARNING: resuming from step 5 with a changed schedule: max_steps"]
    assert event.to_json()["skipped_checkpoints"][0]["step"] == 10
