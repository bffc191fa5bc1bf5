"""``ReportInbox``: the ranks' reports as the coordinator reads them, in each rank's order and
only from the current group.

Ranks push reports fire-and-forget (``Coordinator.report``), tagged with their group's
generation and a per-rank sequence number; a threaded actor may run those calls out of order,
and reports of a torn-down group may still arrive. ``take`` hands out, per rank, the reports
whose predecessors have all arrived, and drops those of other generations.
"""

from __future__ import annotations

import collections
import threading
from typing import Any

Report = tuple[int, str, Any]
"""``(rank, kind, payload)``: kind ``step``, ``eval`` or ``event``."""


class ReportInbox:
    def __init__(self) -> None:
        self._arrived: collections.deque[tuple[int, int, int, str, Any]] = collections.deque()
        self._pending: dict[tuple[int, int], tuple[str, Any]] = {}  # (rank, seq) -> report
        self._next_seq: dict[int, int] = {}
        self._lock = threading.Lock()  # put runs on the actor's call threads

    def put(self, generation: int, rank: int, seq: int, kind: str, payload: Any) -> None:
        with self._lock:
            self._arrived.append((generation, rank, seq, kind, payload))

    def reset(self) -> None:
        """A new group starts: its ranks count from 0 again."""
        with self._lock:
            self._pending.clear()
            self._next_seq.clear()

    def take(self, generation: int) -> list[Report]:
        """The reports of group ``generation`` that are next in their rank's order; a report
        whose predecessor has not arrived yet waits for a later call."""
        with self._lock:
            while self._arrived:
                gen, rank, seq, kind, payload = self._arrived.popleft()
                if gen == generation:
                    self._pending[(rank, seq)] = (kind, payload)
            ready = []
            for rank in sorted({r for r, _ in self._pending}):
                seq = self._next_seq.get(rank, 0)
                while (rank, seq) in self._pending:
                    ready.append((rank, *self._pending.pop((rank, seq))))
                    seq += 1
                self._next_seq[rank] = seq
        return ready

    def received(self, rank: int) -> int:
        """How many of ``rank``'s reports have been handed out in this group."""
        return self._next_seq.get(rank, 0)
