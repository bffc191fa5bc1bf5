"""The plan cache of async saves: reuse the last save's DCP plans while no rank's plan changed.

DCP plans every save collectively (gather of local plans, scatter of final plans, broadcast of
metadata). When every rank's local plan is the one of the last save (same keys, shapes,
dtypes and shards), ``stage_with_cached_plan`` reuses the last final plan and metadata
instead: one small all-reduce (and a gather of errors only when a rank failed).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any, Callable

from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner
from torch.distributed.checkpoint.stateful import Stateful

if TYPE_CHECKING:
    from elastic_ckpt.checkpoint.async_save import StagingWriter


@dataclasses.dataclass(frozen=True)
class PlanCache:
    """What DCP's collective planning decided at the last async save: this rank's local plan
    (as a signature), its final plan (after deduplication) and the global metadata. Valid for
    as long as every rank's local plan is unchanged: same keys, shapes, dtypes and shards.
    ``token`` is the save token every rank agreed on then; saves with these plans tag their
    markers ``f"{token}-{n}"`` (``n`` counts this manager's async saves, the same on every
    rank), so they need no broadcast of a fresh token."""

    signature: tuple
    final_plan: SavePlan
    metadata: Metadata
    token: str

    @classmethod
    def of(cls, writer: "StagingWriter", metadata: Metadata, rank: int, world_size: int,
           token: str) -> "PlanCache | None":
        if writer.local_plan is None or writer.final_plan is None:
            return None
        return cls(plan_signature(writer.local_plan, rank, world_size), writer.final_plan,
                   metadata, token)


def plan_signature(plan: SavePlan, rank: int, world_size: int) -> tuple:
    """Everything of a local save plan the global plan depends on."""
    items = []
    for item in plan.items:
        data = item.tensor_data
        items.append((item.index.fqn, tuple(item.index.offset or ()), item.type.value,
                      None if data is None else (tuple(data.size), str(data.properties.dtype),
                                                 tuple(data.chunk.offsets),
                                                 tuple(data.chunk.sizes))))
    mappings = plan.planner_data if isinstance(plan.planner_data, dict) else {}
    return (rank, world_size, tuple(items),
            tuple(sorted((k, tuple(v)) for k, v in mappings.items())))


def stage_with_cached_plan(state: dict[str, Any], writer: "StagingWriter", cache: PlanCache,
                           planner: SavePlanner, *, rank: int, world_size: int,
                           failure: BaseException | None,
                           count: Callable[[list[int]], list[int]],
                           first_failure: Callable[[BaseException | None],
                                                   BaseException | None]) -> Metadata | None:
    """Stage ``state`` with the plans of the last save instead of DCP's collective planning.

    Collective, with one small collective on every rank whatever happens: ``count`` (a sum
    over ranks) of [my local plan changed, I failed], after this rank planned and staged
    locally. ``failure`` is one this rank met before (rank 0 preparing the directory). If any
    rank failed, ``first_failure`` (a gather: the lowest rank's exception) follows and it is
    raised on every rank. Returns the global metadata, or None when some rank's plan changed
    (nothing usable staged: plan with DCP, which also reproduces any error met while
    planning)."""
    same = False
    try:
        flat = {k: v.state_dict() if isinstance(v, Stateful) else v for k, v in state.items()}
        planner.set_up_planner(flat, writer.storage_meta(), rank == 0)
        writer.set_up_storage_writer(rank == 0, rank=rank, use_collectives=True)
        local = planner.create_local_plan()
        same = plan_signature(local, rank, world_size) == cache.signature
    except Exception:  # noqa: BLE001 - dcp.save meets it again and raises it on every rank
        same = False
    if same and failure is None:
        try:
            writer.prepare_local_plan(local)
            writer.write_data(cache.final_plan, planner).wait()
        except Exception as exc:  # agreed on below, whatever it is
            failure = exc
    changed, failed = count([0 if same else 1, 0 if failure is None else 1])
    if failed:
        raise first_failure(failure)
    return None if changed else cache.metadata
