"""The chaos soak: a seeded random schedule of faults against one elastic run on a loopback
``ray.cluster_utils.Cluster``, which must end equal to the fixed-size reference run (exact
sample ledger, per-step loss rtol 1e-5, final parameters atol 1e-6).

Faults (``FAULTS``), one every ``every`` seconds (uniform): SIGKILL a training rank's process,
remove a node, add a node, drain a node with a 20 s deadline (then remove it), SIGSTOP a
training rank (the hang watchdog must find and kill it), corrupt the latest committed
checkpoint, fill the checkpoint disk (a tmpfs) for 15 s. Each is recorded with the coordinator
event that answered it (none when training went on), the seconds from the fault to that
event's first step, and the steps lost; goodput is the step time of the steps in the final
history over the run's wall time.

``benchmarks/chaos.py`` is the command line (10 minutes); ``tests/test_chaos.py`` runs 2
minutes with 4 faults in the default suite.
"""

from __future__ import annotations

import dataclasses
import os
import random
import signal
import time
from pathlib import Path
from typing import Any, Callable

import ray
from ray_jobs import drain_node

from elastic_ckpt import CheckpointManager

FAULTS = ("kill_worker", "remove_node", "add_node", "drain", "sigstop_worker",
          "corrupt_latest", "fill_disk")
STEP_S = 0.7
"""About how long a step takes here (the ``slow`` fault marker paces the steps)."""
MAX_NODES = 4


def schedule(seed: int, seconds: float, every: tuple[float, float], count: int | None = None,
             kinds: tuple[str, ...] = FAULTS) -> list[tuple[float, str]]:
    """Pure: ``(seconds after the start, fault)``, one every ``every`` seconds (uniform), the
    first after one interval; ``count`` faults, or as many as fit in ``seconds``. Every kind
    comes once before any comes twice (shuffled rounds), so a short soak still mixes them."""
    rng = random.Random(seed)
    out, t, pool = [], 0.0, []
    while count is None or len(out) < count:
        t += rng.uniform(*every)
        if count is None and t > seconds:
            break
        if not pool:
            pool = list(kinds)
            rng.shuffle(pool)
        out.append((round(t, 1), pool.pop()))
    return out


@dataclasses.dataclass
class FaultRecord:
    at_s: float
    kind: str
    detail: str
    at_step: int
    """The last step the driver had been told of (it hears of steps up to ~0.5 s late)."""
    unix_s: float = 0.0
    event: str = ""
    """The coordinator's event that answered the fault (the first one after it, before the
    next fault), or empty when training did not stop for it."""
    recovered_s: float | None = None
    """Seconds from the fault to the first step of the group that event formed (the hang
    watchdog's wait, the drain, teardown, restore... all inside)."""
    steps_lost: int = 0
    """Steps that had completed but were not in the state the new group resumed from."""


@dataclasses.dataclass
class SoakReport:
    faults: list[FaultRecord]
    wall_s: float
    useful_s: float
    final_step: int
    result: Any
    startup_s: float = 0.0
    """From the soak's start to the first group's first step (Ray actors, build, warm-up)."""
    stopped_s: float = 0.0
    """Training stopped for the events after the start: each one's ``detect`` + ``total_s``."""
    param_diffs: dict[str, float] = dataclasses.field(default_factory=dict)
    """Each final parameter's largest absolute difference from the fixed-size reference."""
    param_atol: dict[str, float] = dataclasses.field(default_factory=dict)
    """The tolerance it was held to (1e-6, or twice the spread of fixed-size runs)."""

    def worst_param(self) -> tuple[str, float, float]:
        """``(tensor, difference, tolerance)`` of the parameter nearest its tolerance."""
        fqn = max(self.param_diffs, key=lambda f: self.param_diffs[f] / self.param_atol[f])
        return fqn, self.param_diffs[fqn], self.param_atol[fqn]

    @property
    def goodput(self) -> float:
        return self.useful_s / self.wall_s if self.wall_s else 0.0

    def table(self) -> str:
        rows = ["| at s | fault | detail | at step | event | recovery s | steps lost |",
                "|---|---|---|---|---|---|---|"]
        for f in self.faults:
            rec = "-" if f.recovered_s is None else f"{f.recovered_s:.1f}"
            rows.append(f"| {f.at_s:.0f} | {f.kind} | {f.detail} | {f.at_step} | "
                        f"{f.event or 'none: training went on'} | {rec} | {f.steps_lost} |")
        return "\n".join(rows)


class Soak:
    """One soak: ``run(cluster, start_run)`` with a loopback cluster already up (main thread)
    and a callable that starts the elastic run (a ``ray_jobs.Run``) on it."""

    def __init__(self, plan: list[tuple[float, str]], ckpt_root: Path, disk: Path,
                 seed: int, log: Callable[[str], None] = print) -> None:
        self.plan = plan
        self.ckpt_root = ckpt_root
        self.disk = disk
        self.rng = random.Random(seed + 1)
        self.log = log
        self.records: list[FaultRecord] = []
        self._later: list[tuple[float, Callable[[], None]]] = []  # follow-ups (undrain, ...)
        self._stopped: list[int] = []

    # -- the loop ----------------------------------------------------------------------------
    def run(self, cluster: Any, run: Any) -> SoakReport:
        self.cluster, self.run_ = cluster, run
        self._t0 = t0 = time.monotonic()
        t0_unix = time.time()
        plan = list(self.plan)
        while run.thread.is_alive():
            now = time.monotonic() - t0
            for when, action in [x for x in self._later if x[0] <= now]:
                self._later.remove((when, action))
                action()
            if plan and plan[0][0] <= now:
                _, kind = plan.pop(0)
                self._inject(kind, now)
            time.sleep(0.2)
        wall = time.monotonic() - t0
        for _, action in self._later:  # the run ended first: undo what is still pending
            action()
        self._cleanup()
        result = run.join(0)
        self._attribute(result.events)
        useful = sum(m.step_time_s for m in result.history)
        start = next(e for e in result.events if e.kind == "start")
        stopped = sum(e.phases.get("detect", 0.0) + (e.total_s or 0.0)
                      for e in result.events if e.kind != "start")
        return SoakReport(self.records, wall, useful, result.final_step, result,
                          startup_s=start.started_unix_s + (start.total_s or 0.0) - t0_unix,
                          stopped_s=stopped)

    def _inject(self, kind: str, now: float) -> None:
        step = max((m.step for m in self.run_.steps), default=0)
        detail = getattr(self, f"_{kind}")()
        if detail is None:
            return
        self.log(f"[{now:6.1f} s] fault {kind}: {detail} (at step {step})")
        self.records.append(FaultRecord(round(now, 1), kind, detail, step, time.time()))

    def _attribute(self, events: Any) -> None:
        """Each fault's answer: the first non-start event that began after it and before the
        next fault (a hang's event begins once the watchdog has waited; its ``detect`` phase
        lies before), and the seconds to that event's first step."""
        bounds = [r.unix_s for r in self.records[1:]] + [float("inf")]
        for rec, until in zip(self.records, bounds):
            event = next((e for e in events if e.kind != "start"
                          and rec.unix_s <= e.started_unix_s < until), None)
            if event is None or event.total_s is None:
                continue
            rec.event = event.kind
            rec.recovered_s = round(event.started_unix_s + event.total_s - rec.unix_s, 1)
            rec.steps_lost = event.steps_lost or 0

    # -- faults (each returns what it did, or None when it does not apply now) ---------------
    def _member(self) -> tuple[int, int] | None:
        """A training rank and its pid, from the coordinator (never a spare: a fault the
        training would not notice says nothing about recovery)."""
        try:
            coordinator = ray.get_actor(self.run_.trainer.coordinator_name)
            members = ray.get(coordinator.processes.remote(), timeout=10)["members"]
        except (ValueError, ray.exceptions.RayError):  # the run is starting or ending
            return None
        ranks = [(r, pid) for r, (_, pid) in enumerate(members) if pid not in self._stopped]
        return self.rng.choice(ranks) if ranks else None

    def _kill_worker(self) -> str | None:
        member = self._member()
        if member is None:
            return None
        os.kill(member[1], signal.SIGKILL)
        return f"SIGKILL rank {member[0]} (pid {member[1]})"

    def _sigstop_worker(self) -> str | None:
        member = self._member()
        if member is None:
            return None
        os.kill(member[1], signal.SIGSTOP)
        self._stopped.append(member[1])
        return f"SIGSTOP rank {member[0]} (pid {member[1]})"

    def _worker_nodes(self) -> list[Any]:
        return sorted(self.cluster.worker_nodes, key=lambda n: n.node_id)

    def _remove_node(self) -> str | None:
        nodes = self._worker_nodes()
        if len(nodes) <= 1:
            return self._add_node()
        node = self.rng.choice(nodes)
        self.cluster.remove_node(node)
        return f"removed node {node.node_id[:8]}"

    def _add_node(self) -> str | None:
        if len(self._worker_nodes()) >= MAX_NODES:
            return None
        node = self.cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        return f"added node {node.node_id[:8]}"

    def _drain(self) -> str | None:
        nodes = self._worker_nodes()
        if len(nodes) <= 1:
            return None
        node = self.rng.choice(nodes)
        drain_node(self.cluster.address, node.node_id, deadline_s=20, message="chaos soak")

        def remove() -> None:
            if node in self.cluster.worker_nodes:
                self.cluster.remove_node(node)
                self._add_node()  # the spot node is replaced by another

        self._later.append((self._now() + 20, remove))
        return f"drained node {node.node_id[:8]} (deadline 20 s, then removed and replaced)"

    def _corrupt_latest(self) -> str | None:
        latest = CheckpointManager(str(self.ckpt_root)).latest()
        if latest is None:
            return None
        path = Path(latest.uri) / "rank-00000.bin"
        if not path.exists():
            return None
        with open(path, "r+b") as f:
            f.seek(os.path.getsize(path) // 2)
            byte = f.read(1)
            f.seek(-1, os.SEEK_CUR)
            f.write(bytes([byte[0] ^ 0xFF]))
        return f"flipped a byte of step {latest.step}'s rank-00000.bin"

    def _fill_disk(self) -> str | None:
        filler = self.disk / "filler"
        try:
            with open(filler, "wb") as f:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
        except OSError:
            pass
        self._later.append((self._now() + 15, lambda: filler.unlink(missing_ok=True)))
        return "filled the checkpoint disk for 15 s"

    def _now(self) -> float:
        return time.monotonic() - self._t0

    def _cleanup(self) -> None:
        for pid in self._stopped:  # stopped processes the watchdog did not get to
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def soak(tmp: Path, minutes: float, seed: int, count: int | None = None,
         every: tuple[float, float] = (30.0, 60.0), nodes: int = 2,
         log: Callable[[str], None] = print, spread_sizes: tuple[int, ...] = ()
         ) -> SoakReport:
    """The whole soak: a tmpfs checkpoint disk, the fixed-size reference run, the loopback
    cluster, the elastic run under the fault schedule, then the equivalence checks (raise
    ``AssertionError`` on a mismatch). Everything it started is stopped and unmounted.

    Final parameters are held to atol 1e-6, or with ``spread_sizes`` to twice the spread of
    fault-free runs at those fixed sizes around the reference's (at least 1e-6): over
    hundreds of steps, runs at different fixed world sizes drift apart by more than 1e-6
    (reduction order; 3.6e-6 in a qkv weight between W=2 and W=3 after 857 steps)."""
    from mounts import tmpfs
    from ray_jobs import Faults, Run, loopback_cluster, tiny_config, trainer_kwargs
    from test_elastic_ray import (
        check_exact_training,
        comparable,
        reference_losses,
        reference_parameters,
    )

    with tmpfs(tmp / "disk", "size=64m") as disk:
        config = tiny_config(
            disk, max_steps=int(minutes * 60 / STEP_S), checkpoint__interval_steps=5,
            checkpoint__memory_tier=True, checkpoint__max_failed_saves=1000,
            scaling__max_workers=3, scaling__capacity_timeout_s=600,
            failure__max_failures=None, failure__step_timeout_s=10,
            failure__first_step_timeout_s=120)
        ref = reference_losses(config, disk)
        base = reference_parameters(config)
        atol = {fqn: 1e-6 for fqn in base}
        if spread_sizes:
            for size in spread_sizes:
                reference_losses(config, disk, world_size=size)
                for fqn, value in reference_parameters(config, size).items():
                    spread = (comparable(fqn, value) - comparable(fqn, base[fqn])).abs().max()
                    atol[fqn] = max(atol[fqn], 2 * spread.item())
            log("fixed-size spread (W=2 vs W=" + ", ".join(map(str, spread_sizes))
                + f"): final parameters held to atol up to {max(atol.values()):.1e}")
        faults = Faults(tmp / "faults")
        faults.set("slow")  # paces the steps (~STEP_S): the soak is about wall time
        plan = schedule(seed, minutes * 60, every, count)
        log(f"chaos soak: seed {seed}, {len(plan)} faults planned over "
            f"{plan[-1][0] if plan else 0:.0f} s: " + ", ".join(k for _, k in plan))
        with loopback_cluster(num_nodes=nodes) as cluster:
            run = Run(**trainer_kwargs(config, faults))
            report = Soak(plan, Path(config.checkpoint.uri), disk, seed, log).run(cluster, run)
        report.param_diffs = check_exact_training(report.result, config, ref, atol)
        report.param_atol = atol
    return report
