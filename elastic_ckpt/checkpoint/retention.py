"""Retention policy: which checkpoint directories may be deleted. Pure; the manager acts."""

from __future__ import annotations

from elastic_ckpt.errors import ConfigError


def validate_retention(keep_last: int | None, keep_every: int | None) -> None:
    if keep_last is not None and keep_last < 1:
        raise ConfigError(f"keep_last must be >= 1 or None (keep all), got {keep_last}",
                          field="keep_last")
    if keep_every is not None and keep_every < 1:
        raise ConfigError(f"keep_every must be >= 1 or None, got {keep_every}",
                          field="keep_every")


def steps_to_delete(
    committed: list[int],
    uncommitted: list[int],
    keep_last: int | None,
    keep_every: int | None = None,
    in_progress: frozenset[int] = frozenset(),
) -> list[int]:
    """Steps whose directories retention removes, ascending.

    Keeps the newest ``keep_last`` committed checkpoints (all if None), every committed step
    divisible by ``keep_every``, and always the newest committed one. Uncommitted directories
    are debris only when older than the newest committed checkpoint — a newer one may be a save
    still running elsewhere — and never when listed in ``in_progress``.
    """
    committed = sorted(committed)
    if not committed:
        return []
    newest = committed[-1]
    keep = set(committed if keep_last is None else committed[-keep_last:])
    if keep_every is not None:
        keep |= {s for s in committed if s % keep_every == 0}
    keep.add(newest)
    doomed = {s for s in committed if s not in keep}
    doomed |= {s for s in uncommitted if s < newest}
    return sorted(doomed - set(in_progress))
