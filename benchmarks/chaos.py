"""The chaos soak: an elastic run on a loopback ``ray.cluster_utils.Cluster`` under a seeded
random schedule of faults, which must end equal to the fixed-size reference run.

```
python benchmarks/chaos.py --minutes 10 --seed 1     # a fault every 30-60 s
python benchmarks/chaos.py --minutes 2 --faults 4 --every 20,30
```

Faults: SIGKILL a worker, remove a node, add a node, drain a node with a 20 s deadline (then
remove and replace it), SIGSTOP a worker (the hang watchdog, ``failure.step_timeout_s=10``),
corrupt the latest committed checkpoint, fill the checkpoint disk (a 64 MB tmpfs) for 15 s.
Training: the tiny GPT of the Ray tests, steps paced to ~0.7 s, checkpoint every 5 steps, the
peer-memory tier on. Printed: every fault with the seconds until training got past the step it
was at and the steps it redid; the goodput (step time of the steps in the final history / wall
time of the run); then the checks (exact sample ledger, per-step loss rtol 1e-5, final
parameters against the same run at a fixed 2 workers without Ray, atol 1e-6 or twice the spread
of fault-free runs at fixed 1 and 3 workers, whichever is larger: over hundreds of steps
those drift apart by more than 1e-6 on their own). The engine is
``tests/chaos.py`` (also run by ``tests/test_chaos.py``); needs root for the tmpfs.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

# Before ray is imported: every node binds and advertises 127.0.0.1 (on a machine with a routable
# interface Ray would otherwise dial the GCS at that interface's address, where it does not
# listen).
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))
from _common import banner, loadavg  # noqa: E402
from chaos import soak  # noqa: E402

GOODPUT_GOAL = 0.95


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--minutes", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--faults", type=int, default=None, help="this many (default: as fit)")
    p.add_argument("--every", default="30,60", help="seconds between faults, min,max")
    p.add_argument("--nodes", type=int, default=2, help="1-CPU worker nodes at the start")
    p.add_argument("--spread-sizes", default="1,3",
                   help="fixed world sizes whose drift from W=2 sets the final-parameter "
                   "tolerance (twice it, at least 1e-6); '' for a flat 1e-6")
    o = p.parse_args(argv)
    every = tuple(float(x) for x in o.every.split(","))
    banner(__file__, argv)
    tmp = Path(tempfile.mkdtemp(prefix="chaos-"))
    try:
        sizes = tuple(int(x) for x in o.spread_sizes.split(",") if x)
        report = soak(tmp, o.minutes, o.seed, o.faults, every, o.nodes,  # raises on mismatch
                      spread_sizes=sizes)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(report.table())
    recovered = [f.recovered_s for f in report.faults if f.recovered_s is not None]
    answered = sum(1 for f in report.faults if f.event)
    print(f"\n{len(report.faults)} faults over {report.wall_s:.0f} s ({answered} answered by a "
          f"resize or recovery, the rest absorbed while training went on), final step "
          f"{report.final_step}; recovery median "
          f"{sorted(recovered)[len(recovered) // 2] if recovered else float('nan'):.1f} s, "
          f"max {max(recovered, default=float('nan')):.1f} s; steps lost "
          f"{sum(f.steps_lost for f in report.faults)}")
    print(f"goodput {report.goodput:.1%} ({report.useful_s:.1f} s of useful step time in "
          f"{report.wall_s:.1f} s); goal >= {GOODPUT_GOAL:.0%}: "
          f"{'met' if report.goodput >= GOODPUT_GOAL else 'MISSED'}")
    other = report.wall_s - report.useful_s - report.startup_s - report.stopped_s
    print(f"where the rest went: startup to the first step {report.startup_s:.1f} s, training "
          f"stopped for resizes and recoveries {report.stopped_s:.1f} s (detect + event), "
          f"between steps {other:.1f} s (checkpoint and snapshot work outside the step, "
          "reports, the end)")
    fqn, diff, tol = report.worst_param()
    print("equivalence with the fixed-size run: exact ledger, losses rtol 1e-5, final "
          f"parameters: passed (nearest its tolerance: {fqn}, |diff| {diff:.1e} <= atol "
          f"{tol:.1e}); load average now {loadavg()}")


if __name__ == "__main__":
    main()
