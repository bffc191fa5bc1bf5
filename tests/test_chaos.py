"""``ray`` + ``fault``: the chaos soak (``tests/chaos.py``): 2 minutes with 4 faults in the
default suite, 10 minutes marked ``slow`` (``benchmarks/chaos.py`` prints the figures)."""

from __future__ import annotations

import pytest
from chaos import FAULTS, schedule, soak

pytestmark = [pytest.mark.ray, pytest.mark.fault]


def test_schedule_is_seeded_and_mixes_every_kind() -> None:
    plan = schedule(7, 600, (30, 60))
    assert plan == schedule(7, 600, (30, 60)) and plan != schedule(8, 600, (30, 60))
    assert all(30 <= b - a <= 60 for (a, _), (b, _) in zip([(0, "")] + plan, plan))
    assert {k for _, k in plan[:len(FAULTS)]} == set(FAULTS)  # each kind once per round
    assert len(schedule(7, 0, (30, 60), count=4)) == 4


@pytest.mark.timeout(900)
def test_two_minute_chaos_soak_ends_equal_to_the_reference(tmp_path) -> None:
    # soak raises unless the run equals the reference (final parameters atol 1e-6: 171 steps)
    report = soak(tmp_path, minutes=2, seed=3, count=4, every=(15, 25))
    print(report.table())
    print(f"goodput {report.goodput:.1%} ({report.useful_s:.1f} s of useful steps in "
          f"{report.wall_s:.1f} s)")
    assert len(report.faults) >= 3, report.table()  # one may not apply at its moment


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_ten_minute_chaos_soak(tmp_path) -> None:
    report = soak(tmp_path, minutes=10, seed=1, spread_sizes=(1, 3))  # 857 steps: see soak
    print(report.table())
    print(f"goodput {report.goodput:.1%}; final parameter nearest its tolerance: "
          f"{report.worst_param()}")
    assert len(report.faults) >= 8
