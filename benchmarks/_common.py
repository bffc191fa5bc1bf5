"""Shared helpers for the benchmarks: spawn gloo rank groups, time collectives and named calls,
read I/O counters, drop the page cache, describe the machine (``banner``, ``loadavg``) and print
markdown tables. The model builders are in ``_models.py``, the trainer configs in ``_configs.py``.

Self-contained on purpose (no import from ``tests/``): benchmarks must run from a checkout
without the test tree on ``sys.path``.
"""

from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
import time
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist

from elastic_ckpt.train.local import run_ranks

GB = 1e9


# -- process groups -----------------------------------------------------------------------------
def run_group(world_size: int, fn: Callable, *args: Any, timeout_s: float = 3600,
              threads_per_rank: int | None = None) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` fresh gloo ranks (the product's
    local launcher; ``fn`` must be importable at module level). Returns results by rank;
    raises with the failing rank's traceback if any rank fails. By default the cores are
    split between the ranks."""
    if threads_per_rank is None:
        threads_per_rank = max(1, (os.cpu_count() or 1) // world_size)
    return run_ranks(world_size, fn, *args, threads_per_rank=threads_per_rank,
                     timeout_s=timeout_s)


def timed_collective(fn: Callable[[], Any]) -> tuple[float, Any]:
    """Barrier, run ``fn`` (a collective), return ``(this rank's seconds, result)``. The
    collective's time is the max over ranks of the returned seconds."""
    dist.barrier()
    start = time.perf_counter()
    out = fn()
    return time.perf_counter() - start, out


class PhaseTimers:
    """Seconds spent in named calls, summed per key into ``totals``: ``wrap`` a callable, or
    ``patch`` a class's method in place (once per process; the library code is not changed).
    A call whose result has ``.wait()`` (a future) is timed until that returns."""

    def __init__(self) -> None:
        self.totals: dict[str, float] = {}

    def wrap(self, key: str, fn: Callable) -> Callable:
        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            try:
                out = fn(*args, **kwargs)
                if hasattr(out, "wait"):
                    out.wait()
                return out
            finally:
                self.totals[key] = self.totals.get(key, 0.0) + time.perf_counter() - start
        wrapper.__wrapped__ = fn
        return wrapper

    def patch(self, cls: type, method: str, key: str) -> None:
        """Time every call of ``cls.method`` under ``key`` (no-op if already patched)."""
        if not hasattr(getattr(cls, method), "__wrapped__"):
            setattr(cls, method, self.wrap(key, getattr(cls, method)))

    def clear(self) -> None:
        self.totals.clear()


# -- I/O and the page cache ---------------------------------------------------------------------
def proc_io() -> dict[str, int]:
    """This process's ``/proc/self/io`` counters (all threads): ``rchar``/``wchar`` are bytes
    passed through read/write syscalls, ``read_bytes``/``write_bytes`` bytes that hit the block
    layer. Empty if unavailable."""
    try:
        with open("/proc/self/io") as f:
            return {k: int(v) for k, v in (line.split(":") for line in f)}
    except OSError:
        return {}


def io_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {k: after[k] - before.get(k, 0) for k in after}


def can_drop_page_cache() -> bool:
    return os.access("/proc/sys/vm/drop_caches", os.W_OK)


def drop_page_cache() -> bool:
    """``sync`` then drop clean page-cache pages. True if it worked (needs root)."""
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def collective_drop_page_cache(enabled: bool) -> bool:
    """All ranks: barrier, rank 0 syncs and (if ``enabled``) drops the page cache, barrier.
    Returns whether it dropped."""
    dist.barrier()
    ok = False
    if dist.get_rank() == 0:
        ok = drop_page_cache() if enabled else (os.sync() or False)
    dist.barrier()
    return ok


# -- machine and formatting ---------------------------------------------------------------------
def machine_info() -> dict[str, str]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    ram = "?"
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemTotal"):
                    ram = f"{int(line.split()[1]) / 2**20:.1f} GiB"
                    break
    except OSError:
        pass
    return {"cores": str(os.cpu_count()), "cpu": cpu, "ram": ram,
            "python": platform.python_version(), "torch": torch.__version__,
            "os": platform.platform()}


def loadavg() -> str:
    """The 1/5/15-minute load average, e.g. ``1.52/1.80/2.01`` (``?`` where unavailable)."""
    try:
        return "/".join(f"{x:.2f}" for x in os.getloadavg())
    except (OSError, AttributeError):
        return "?"


def command_line(script: str, argv: Sequence[str] | None = None) -> str:
    """How to re-run this: ``python <script, relative to the cwd> <args>`` (shell-quoted;
    ``argv`` defaults to ``sys.argv[1:]``)."""
    args = sys.argv[1:] if argv is None else list(argv)
    return " ".join(["python", shlex.quote(os.path.relpath(script))]
                    + [shlex.quote(a) for a in args])


def banner(script: str, argv: Sequence[str] | None = None, *, storage: str | None = None,
           versions: dict[str, str] | None = None) -> tuple[str, dict[str, str]]:
    """Print the head every benchmark starts with: the command line, the machine (cores, CPU,
    RAM, python, torch and ``versions``, OS), where ``storage`` lives (when given) and the load
    average. Returns ``(command line, machine_info())`` for the report."""
    cmd, info = command_line(script, argv), machine_info()
    libs = {"python": info["python"], "torch": info["torch"], **(versions or {})}
    print(f"command: {cmd}")
    print(f"machine: {info['cores']} cores ({info['cpu']}), {info['ram']} RAM; "
          + ", ".join(f"{k} {v}" for k, v in libs.items()) + f"; {info['os']}")
    if storage is not None:
        print(f"storage: {storage} on {disk_of(storage)}")
    print(f"load average at start: {loadavg()} (other processes on this machine share its "
          "cores and disk; timings include their noise)", flush=True)
    return cmd, info


def disk_of(path: str) -> str:
    """The device/filesystem holding ``path`` (best effort, for the report)."""
    try:
        out = subprocess.run(["df", "-hT", path], capture_output=True, text=True, timeout=5)
        lines = out.stdout.strip().splitlines()
        if len(lines) >= 2:
            f = lines[1].split()
            return f"{f[0]} ({f[1]}, {f[2]} total, {f[4]} free)"
    except (OSError, subprocess.SubprocessError):
        pass
    return "?"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |"

    sep = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), sep] + [line(r) for r in cells[1:]])


def fmt_bytes(n: float) -> str:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{n:.0f} B"
