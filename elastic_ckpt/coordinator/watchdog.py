"""``HangWatchdog``: is the group still making progress? Pure: told when a group starts and
when any of its ranks reports (a step, an eval, a checkpoint staged or committed, a restore),
asked at each coordinator poll whether the group is hung.

The limit is ``failure.step_timeout_s`` once the group has made its first step, and
``failure.first_step_timeout_s`` before it (the model build, the restore, compilation and
warm-up come first). A rank that is stopped (``SIGSTOP``), deadlocked, or blocked in a
collective whose peer is, reports nothing, and neither do its peers: the whole group goes
quiet, so the watchdog judges the group; which ranks are stuck is found by the coordinator
(a rank whose process no longer answers).
"""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Hang:
    """No progress for ``seconds`` (more than ``limit_s``); ``first_step``: the group had not
    made its first step yet (the limit was ``first_step_timeout_s``)."""

    seconds: float
    limit_s: float
    first_step: bool
    setting: str
    """The config field that set the limit, for the error message."""


class HangWatchdog:
    def __init__(self, step_timeout_s: float | None,
                 first_step_timeout_s: float | None) -> None:
        self.step_timeout_s = step_timeout_s
        self.first_step_timeout_s = first_step_timeout_s
        self._last: float | None = None  # None: no group running
        self._stepped = False

    def start(self, now: float) -> None:
        """A group was launched: its first step gets ``first_step_timeout_s``."""
        self._last, self._stepped = now, False

    def stop(self) -> None:
        """The group ended (a resize, a failure, the end): nothing to watch."""
        self._last = None

    def progress(self, now: float, step: bool = False) -> None:
        """A rank of the running group reported; ``step``: a completed step."""
        if self._last is not None:
            self._last = max(self._last, now)
            self._stepped = self._stepped or step

    def check(self, now: float) -> Hang | None:
        if self._last is None:
            return None
        limit, setting = ((self.step_timeout_s, "failure.step_timeout_s") if self._stepped
                          else (self.first_step_timeout_s, "failure.first_step_timeout_s"))
        quiet = now - self._last
        if limit is None or quiet <= limit:
            return None
        return Hang(quiet, limit, not self._stepped, setting)
