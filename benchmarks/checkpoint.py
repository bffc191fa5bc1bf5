"""Save and re-shard load of an FSDP2 model + AdamW state: elastic_ckpt vs plain DCP.

```
python benchmarks/checkpoint.py                 # ~2 GB of model + optimizer state (default)
python benchmarks/checkpoint.py --gb 0.2        # quick smoke run
python benchmarks/checkpoint.py --repeats 3 --dir /mnt/nvme/bench
python benchmarks/checkpoint.py --shape linear8  # 8 x Linear(2048, 2048), a fixed 0.40 GB
```

Cases: save at W=2 and W=4; load 2->2, 2->3 (from the W=2 save) and 4->3 (from the W=4 save).
Both libraries save the same model (same seed, one AdamW step) through the same ``AppState``
(``get_state_dict``/``set_state_dict``, sharded), to the same disk, in the same run:

* elastic_ckpt: ``CheckpointManager(root).save(1, {"app": AppState(...)})`` / ``.load(...)``
* DCP: ``dcp.save({"app": AppState(...)}, storage_writer=FileSystemWriter(dir))`` /
  ``dcp.load(..., storage_reader=FileSystemReader(dir))`` with their default options.

The model (``_models.py``): ``--shape blocks`` (default) is an embedding + 3 residual MLP
blocks sized by ``--gb``, every dim odd and not a multiple of 3 (uneven shards at W=2, 3, 4),
``fully_shard`` per block + root; ``--shape linear8`` is 8 x ``Linear(2048, 2048)`` (ReLUs
between), ``fully_shard`` per Linear + root, a fixed 0.40 GB with AdamW state (``--gb`` is
ignored).

Each save world size and each load case runs in its own freshly spawned gloo group (1-D CPU
mesh), both libraries back to back inside it so drifting background load hits both alike;
their order alternates between cases and repeats. The page cache is dropped before every
timed load when ``/proc/sys/vm/drop_caches`` is writable (cold reads for both; otherwise both
read warm), and ``sync``ed before every timed save. Each group first does one untimed tiny
save (or load) per library, so one-time costs (lazy imports, first planning) land in neither
timed call. Before each timed load the model and optimizer state are
overwritten with NaN.

Reported per case: seconds (max over ranks, barrier-aligned start), CPU seconds (summed over
ranks; less sensitive to other load on the machine), GB/s (logical tensor bytes
/ seconds; for loads the bytes the ranks needed), read amplification (bytes read from storage /
bytes needed, summed over ranks) and elastic/DCP time. Amplification for elastic_ckpt is
``CheckpointManager.last_read_stats``; for DCP it is the sum of the stored lengths of the items
each rank's read plan touches (``FileSystemReader`` ``torch.load``s every touched item whole),
counted in a ``FileSystemReader`` subclass. As a cross-check both are also measured at the
syscall level (``rchar`` from ``/proc/self/io``, all threads; gloo receives via ``recvmsg`` so
it does not count). After every load each rank hashes its shard of every tensor of the loaded
state (a layout-independent hash of the bits weighted by global element index, summed over
ranks) and the run fails if it differs from the hash taken right before the save.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torch.nn as nn
from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter
from torch.distributed.checkpoint.planner import LoadItemType
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.tensor import DTensor, Shard

from elastic_ckpt.checkpoint.manifest import step_dirname

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import (  # noqa: E402
    GB,
    PhaseTimers,
    banner,
    can_drop_page_cache,
    collective_drop_page_cache,
    fmt_bytes,
    io_delta,
    loadavg,
    markdown_table,
    proc_io,
    run_group,
    timed_collective,
)
from _models import (  # noqa: E402
    SHAPES,
    build,
    flatten_state,
    local_state_bytes,
    model_dims,
    state_gb,
    train_step,
)

ELASTIC, DCP = "elastic_ckpt", "dcp"
LIBS = (ELASTIC, DCP)
SAVE_WORLDS = (2, 4)
LOAD_CASES = ((2, 2), (2, 3), (4, 3))
TARGET_LOAD_RATIO = 0.6
TARGET_AMP = 1.01
SAVE_TIE = 0.05
STEADY_FROM = 2
"""Saves from this index on are "steady": elastic_ckpt overwrites recycled files."""
TARGET_STEADY_SAVE = 0.5
"""Issue 10: a steady save <= 0.5x DCP's, DCP writing a new directory per step."""
"""Saves are disk-bound: a difference under 5% is reported as a tie, not a miss."""
MASK64 = (1 << 64) - 1


# -- a layout-independent hash of the sharded state ---------------------------------------------
_INT_VIEW = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}
_STEP_ELEMS = 1 << 22


def _hash_local(local: torch.Tensor, first_index: int) -> int:
    """sum_i bits(x_i) * (2 * K * (first_index + i) + 1) mod 2^64 over a contiguous run of
    elements whose global flat indices start at ``first_index``. The weights are odd, so any
    single changed element changes the hash; summing over ranks makes it layout-independent."""
    flat = local.detach().reshape(-1)
    bits = flat.view(_INT_VIEW[flat.element_size()])
    total = 0
    for start in range(0, bits.numel(), _STEP_ELEMS):
        part = bits[start:start + _STEP_ELEMS].to(torch.int64)
        weights = torch.arange(first_index + start, first_index + start + part.numel(),
                               dtype=torch.int64).mul_(2 * 0x9E3779B1).add_(1)
        total += int(part.mul_(weights).sum())
    return total & MASK64


def state_hashes(app) -> dict[str, tuple[str, Any]]:
    """fqn -> ("sharded", this rank's share of the hash) | ("replicated", hash) |
    ("object", repr). The parent sums sharded shares over ranks."""
    flat = flatten_state(app.state_dict())
    out: dict[str, tuple[str, Any]] = {}
    for fqn, value in flat.items():
        if isinstance(value, DTensor):
            if not all(isinstance(p, Shard) and p.dim == 0 for p in value.placements):
                raise NotImplementedError(f"{fqn}: placements {value.placements}")
            local = value.to_local()
            chunk = value.__create_chunk_list__()[0]
            row = math.prod(value.shape[1:]) if value.dim() > 1 else 1
            first = chunk.offsets[0] * row if value.dim() else 0
            out[fqn] = ("sharded", _hash_local(local.contiguous(), first) if local.numel() else 0)
        elif isinstance(value, torch.Tensor):
            out[fqn] = ("replicated", _hash_local(value.contiguous(), 0))
        else:
            out[fqn] = ("object", repr(value))
    return out


def combine_hashes(per_rank: list[dict[str, tuple[str, Any]]]) -> dict[str, Any]:
    combined: dict[str, Any] = {}
    for fqn, (kind, value) in per_rank[0].items():
        values = [r[fqn][1] for r in per_rank]
        if kind == "sharded":
            combined[fqn] = sum(values) & MASK64
        elif len(set(values)) == 1:
            combined[fqn] = values[0]
        else:
            combined[fqn] = ("ranks disagree", tuple(values))
    return combined


def compare_hashes(saved: dict[str, Any], loaded: dict[str, Any]) -> list[str]:
    bad = [k for k in saved if saved[k] != loaded.get(k)]
    bad += [k for k in loaded if k not in saved]
    return bad


# -- timing instrumentation (benchmark-local wrappers; the libraries are not modified) ----------
TIMERS = PhaseTimers()


def _install_timers() -> None:
    from elastic_ckpt.checkpoint.app_state import AppState
    from elastic_ckpt.checkpoint.reader import ShardReader
    from elastic_ckpt.checkpoint.writer import ShardWriter

    for cls, meth, key in ((AppState, "state_dict", "state_dict"),
                           (AppState, "load_state_dict", "set_state"),
                           (ShardWriter, "write_data", "io"),
                           (ShardWriter, "finish", "commit"),
                           (ShardReader, "read_data", "io")):
        TIMERS.patch(cls, meth, key)


class TimedFileSystemWriter(FileSystemWriter):
    """``FileSystemWriter`` with default options; only times ``write_data`` and ``finish``."""

    def write_data(self, plan, planner):
        return TIMERS.wrap("io", super().write_data)(plan, planner)

    def finish(self, metadata, results):
        return TIMERS.wrap("commit", super().finish)(metadata, results)


class CountingFileSystemReader(FileSystemReader):
    """``FileSystemReader`` that counts, per rank, the stored bytes of every item its read plan
    touches (``read_data`` ``torch.load``s each touched item whole, once per read item) and the
    bytes the plan needs (the requested boxes)."""

    def __init__(self, path: str) -> None:
        super().__init__(path)
        self.bytes_read = 0
        self.bytes_needed = 0

    def read_data(self, plan, planner):
        tensor_md = planner.metadata.state_dict_metadata
        for item in plan.items:
            if item.type == LoadItemType.BYTE_IO:
                continue
            self.bytes_read += self.storage_data[item.storage_index].length
            itemsize = tensor_md[item.storage_index.fqn].properties.dtype.itemsize
            self.bytes_needed += math.prod(item.lengths) * itemsize
        return TIMERS.wrap("io", super().read_data)(plan, planner)


def _dir_bytes(path: str) -> int:
    total = 0
    for base, _, files in os.walk(path):
        total += sum(os.path.getsize(os.path.join(base, f)) for f in files)
    return total


# -- phases (each runs on a freshly spawned group) ----------------------------------------------
def save_phase(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    from elastic_ckpt import AppState, CheckpointManager

    _install_timers()
    model, optimizer = build(world_size, cfg["dims"], seed=1)
    train_step(model, optimizer, cfg["dims"])
    app = AppState(model, optimizer)
    hashes = state_hashes(app) if cfg["verify"] else {}
    local_bytes = local_state_bytes(app)
    out: dict[str, Any] = {"hashes": hashes, "local_bytes": local_bytes, "libs": {}}
    _warm_up_saves(cfg["warmup_dir"])
    mgrs = {ELASTIC: CheckpointManager(cfg["paths"][ELASTIC], keep_last=1)}
    for lib in LIBS:
        out["libs"][lib] = []
    for i in range(cfg["saves"]):
        step = i + 1
        for lib in (cfg["order"] if i % 2 == 0 else cfg["order"][::-1]):
            path = cfg["paths"][lib]
            # Saves read nothing: flush dirty pages but keep the filesystem metadata cached.
            # In a 0.2 GB trial with drop_caches here, whichever library saved first after
            # the drop was ~0.3 s slower (re-reading ext4 metadata, presumably).
            dropped = collective_drop_page_cache(False)
            TIMERS.clear()
            cpu0 = time.process_time()
            if lib == ELASTIC:  # keep_last=1: from the third save on, files are recycled
                seconds, _ = timed_collective(lambda: mgrs[ELASTIC].save(step, {"app": app}))
                where = os.path.join(path, step_dirname(step))  # not the recycle pool
            else:  # a new directory per step; the one before is removed (untimed)
                where = os.path.join(path, f"step-{step}")
                writer = TimedFileSystemWriter(where)
                seconds, _ = timed_collective(lambda: dcp.save({"app": app},
                                                               storage_writer=writer))
            cpu = time.process_time() - cpu0
            dist.barrier()
            if lib == DCP and rank == 0:
                shutil.rmtree(os.path.join(path, f"step-{step - 1}"), ignore_errors=True)
            out["libs"][lib].append({"seconds": seconds, "cpu": cpu,
                                     "parts": dict(TIMERS.totals), "dropped": dropped,
                                     "disk_bytes": _dir_bytes(where) if rank == 0 else 0})
            dist.barrier()
    return out


def _warm_up_saves(directory: str) -> None:
    """Untimed: one tiny sharded save per library, so one-time costs (lazy imports, first
    DTensor planning, directory creation) are paid by neither timed save."""
    from elastic_ckpt import CheckpointManager
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    tiny = {"w": distribute_tensor(torch.zeros(64, 7), mesh, [Shard(0)])}
    CheckpointManager(os.path.join(directory, ELASTIC), keep_last=1).save(0, {"t": tiny})
    dcp.save({"t": tiny}, storage_writer=FileSystemWriter(os.path.join(directory, DCP)))
    dist.barrier()


def raw_io_phase(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, float]:
    """The disk's ceiling for this run: each rank writes ``bytes / W`` to a new file of its
    own with plain ``os.write`` (64 MiB buffers) + ``fsync``, then overwrites the same file in
    place (no truncate: its blocks are allocated) + ``fsync``, then (page cache dropped) reads
    it back with 64 MiB ``preadv``s."""
    path = os.path.join(cfg["dir"], f"raw-{rank}.bin")
    nbytes = cfg["bytes"] // world_size
    block = torch.randint(0, 256, (64 << 20,), dtype=torch.uint8,
                          generator=torch.Generator().manual_seed(rank)).numpy()
    view = memoryview(block)

    def write(flags: int = os.O_TRUNC) -> None:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | flags, 0o644)
        try:
            left = nbytes
            while left:
                left -= os.write(fd, view[:min(left, len(view))])
            os.fsync(fd)
        finally:
            os.close(fd)

    def read() -> None:
        fd = os.open(path, os.O_RDONLY)
        try:
            offset = 0
            while n := os.preadv(fd, [view], offset):
                offset += n
        finally:
            os.close(fd)

    collective_drop_page_cache(False)
    write_s, _ = timed_collective(write)
    collective_drop_page_cache(False)
    overwrite_s, _ = timed_collective(lambda: write(0))  # the same, allocated, blocks again
    collective_drop_page_cache(cfg["drop"])
    read_s, _ = timed_collective(read)
    dist.barrier()
    os.remove(path)
    return {"write": write_s, "overwrite": overwrite_s, "read": read_s}


def load_phase(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    """One load case: both libraries back to back in this group (order from ``cfg``), so a
    drift in background load hits both alike. Before each timed load the model and optimizer
    state are overwritten with NaN, so every element must come from the checkpoint."""
    from elastic_ckpt import AppState, CheckpointManager

    _install_timers()
    model, optimizer = build(world_size, cfg["dims"], seed=2)
    app = AppState(model, optimizer)
    app.state_dict()  # creates the (empty) AdamW state up front, untimed, for both libraries
    _warm_up_loads(cfg["warmup_dir"])
    out: dict[str, Any] = {}
    for lib in cfg["order"]:
        path = cfg["paths"][lib]
        _poison(model, optimizer)
        dropped = collective_drop_page_cache(cfg["drop"])
        TIMERS.clear()
        before, cpu0 = proc_io(), time.process_time()
        if lib == ELASTIC:
            mgr = CheckpointManager(path)
            seconds, _ = timed_collective(lambda: mgr.load({"app": app}))
            read, needed = mgr.last_read_stats.bytes_read, mgr.last_read_stats.bytes_needed
        else:
            reader = CountingFileSystemReader(path)
            seconds, _ = timed_collective(lambda: dcp.load({"app": app}, storage_reader=reader))
            read, needed = reader.bytes_read, reader.bytes_needed
        cpu = time.process_time() - cpu0
        rchar = io_delta(before, proc_io()).get("rchar", 0)
        dist.barrier()
        out[lib] = {"seconds": seconds, "cpu": cpu, "parts": dict(TIMERS.totals),
                    "dropped": dropped, "bytes_read": read, "bytes_needed": needed, "rchar": rchar,
                    "hashes": state_hashes(app) if cfg["verify"] else {}}
    return out


@torch.no_grad()
def _poison(model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
    tensors = list(model.parameters())
    tensors += [v for st in optimizer.state.values() for v in st.values()
                if isinstance(v, torch.Tensor)]
    for t in tensors:
        (t.to_local() if isinstance(t, DTensor) else t).fill_(float("nan"))


def _warm_up_loads(directory: str) -> None:
    """Untimed: load the tiny warm-up checkpoints of the save group with each library."""
    from elastic_ckpt import CheckpointManager
    from torch.distributed.tensor import distribute_tensor

    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    tiny = {"w": distribute_tensor(torch.ones(64, 7), mesh, [Shard(0)])}
    CheckpointManager(os.path.join(directory, ELASTIC)).load({"t": tiny})
    dcp.load({"t": tiny}, storage_reader=FileSystemReader(os.path.join(directory, DCP)))
    if not bool((tiny["w"].to_local() == 0).all()):
        raise AssertionError("warm-up load returned wrong values")
    dist.barrier()


# -- driver -------------------------------------------------------------------------------------
def _default_dir() -> str:
    repo_parent = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    return repo_parent if os.access(repo_parent, os.W_OK) else tempfile.gettempdir()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gb", type=float, default=2.0,
                    help="GB of model + AdamW state in total (default 2.0; 0.2 = quick); "
                         "--shape blocks only")
    ap.add_argument("--shape", choices=SHAPES, default="blocks",
                    help="blocks (default): embedding + 3 MLP blocks sized by --gb, "
                         "fully_shard per block + root; linear8: 8 x Linear(2048, 2048), "
                         "fully_shard per Linear + root, a fixed 0.40 GB (--gb is ignored)")
    ap.add_argument("--dir", default=None,
                    help="parent directory for the checkpoints (default: a temp dir under "
                         "the repo's parent, else /tmp); removed afterwards")
    ap.add_argument("--repeats", type=int, default=1, help="repeat every case (median shown)")
    ap.add_argument("--no-drop-cache", action="store_true",
                    help="do not drop the page cache before timed phases")
    ap.add_argument("--no-verify", action="store_true", help="skip the state hash check")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints on disk")
    ap.add_argument("--saves", type=int, default=4,
                    help=f"saves per library per world size (default 4, at least "
                         f"{STEADY_FROM + 1}): the first writes new files; elastic_ckpt "
                         "(keep_last=1) recycles from the third on, DCP writes a new "
                         "directory each time")
    ap.add_argument("--async-gb", type=float, action="append",
                    help="state sizes of the async sections (repeatable; default 0.4 and 2)")
    ap.add_argument("--no-async", action="store_true",
                    help="skip the async sections (stall vs sync save and dcp.async_save; "
                         "training steps/s with async saves every K steps)")
    args = ap.parse_args(argv)
    if args.saves <= STEADY_FROM:
        ap.error(f"--saves must be at least {STEADY_FROM + 1}")

    dims = model_dims(args.gb, args.shape)
    # The state's size: as asked for blocks (dims are rounded to it), fixed for linear8.
    gb = args.gb if args.shape == "blocks" else state_gb(dims)
    size = f"{gb:g} GB" if args.shape == "blocks" else f"{gb:.2f} GB"
    state = f"{size} of FSDP2 model + AdamW state" + (
        "" if args.shape == "blocks" else f" ({args.shape}: a fixed size, --gb ignored)")
    drop = (not args.no_drop_cache) and can_drop_page_cache()
    parent = args.dir or _default_dir()
    os.makedirs(parent, exist_ok=True)
    root = tempfile.mkdtemp(prefix="ckpt-bench-", dir=parent)
    cmd, info = banner(__file__, argv, storage=root)
    print(f"model: {dims}; {state}; page cache dropped before each timed load: "
          f"{'yes' if drop else 'NO (reads are warm-cache for both libraries)'}; "
          "before each timed save: sync only")
    print(flush=True)

    saves: dict[tuple[int, str], list[dict]] = {}
    loads: dict[tuple[int, int, str], list[dict]] = {}
    failures: list[str] = []
    saved_hashes: dict[tuple[int, str], dict] = {}
    total_bytes: dict[int, int] = {}
    started = time.perf_counter()
    raw: list[dict[str, float]] = []

    def raw_io(when: str) -> None:
        nbytes = int(gb * GB)
        res = run_group(2, raw_io_phase, {"dir": root, "bytes": nbytes, "drop": drop})
        w, o, r = (max(x[k] for x in res) for k in ("write", "overwrite", "read"))
        raw.append({"when": when, "bytes": nbytes, "write": w, "overwrite": o, "read": r})
        print(f"raw sequential I/O ({when}), 2 ranks x {fmt_bytes(nbytes / 2)}: new file "
              f"write+fsync {w:.2f}s ({nbytes / w / GB:.2f} GB/s), overwrite in place+fsync "
              f"{o:.2f}s ({nbytes / o / GB:.2f} GB/s), {'cold ' if drop else ''}read "
              f"{r:.2f}s ({nbytes / r / GB:.2f} GB/s)", flush=True)

    try:
        raw_io("before")
        for rep in range(args.repeats):
            rep_dir = os.path.join(root, f"r{rep}")
            paths = {(w, lib): os.path.join(rep_dir, f"{lib}-w{w}") for w in SAVE_WORLDS
                     for lib in LIBS}
            for i, w in enumerate(SAVE_WORLDS):
                order = LIBS if (rep + i) % 2 == 0 else LIBS[::-1]
                cfg = {"dims": dims, "verify": not args.no_verify, "drop": drop, "order": order,
                       "paths": {lib: paths[(w, lib)] for lib in LIBS}, "saves": args.saves,
                       "warmup_dir": os.path.join(rep_dir, f"warmup-w{w}")}
                t0 = time.perf_counter()
                res = run_group(w, save_phase, cfg)
                total_bytes[w] = sum(r["local_bytes"] for r in res)
                for lib in order:
                    for i in range(args.saves):
                        per_rank = [r["libs"][lib][i] for r in res]
                        kind = "first" if i == 0 else "steady" if i >= STEADY_FROM else None
                        if kind is None:
                            continue
                        saves.setdefault((w, lib, kind), []).append(_summarize(per_rank))
                        saves[(w, lib, kind)][-1]["disk_bytes"] = per_rank[0]["disk_bytes"]
                    if not args.no_verify:
                        saved_hashes[(w, lib)] = combine_hashes([r["hashes"] for r in res])
                print(f"[rep {rep}] {args.saves} saves W={w}: " + ", ".join(
                    f"{lib} " + " ".join(f"{max(r['libs'][lib][i]['seconds'] for r in res):.2f}"
                                         for i in range(args.saves)) + "s" for lib in order)
                      + f"  (group {time.perf_counter() - t0:.0f}s, load avg {loadavg()})",
                      flush=True)
            for i, (w_from, w_to) in enumerate(LOAD_CASES):
                order = LIBS if (rep + i) % 2 == 0 else LIBS[::-1]
                cfg = {"dims": dims, "verify": not args.no_verify, "drop": drop, "order": order,
                       "paths": {ELASTIC: paths[(w_from, ELASTIC)],
                                 DCP: os.path.join(paths[(w_from, DCP)],
                                                   f"step-{args.saves}")},
                       "warmup_dir": os.path.join(rep_dir, f"warmup-w{w_from}")}
                t0 = time.perf_counter()
                res = run_group(w_to, load_phase, cfg)
                line = []
                for lib in order:
                    per_rank = [r[lib] for r in res]
                    summary = _summarize(per_rank)
                    summary.update(
                        bytes_read=sum(r["bytes_read"] for r in per_rank),
                        bytes_needed=sum(r["bytes_needed"] for r in per_rank),
                        rchar=sum(r["rchar"] for r in per_rank))
                    status = "not verified"
                    if not args.no_verify:
                        bad = compare_hashes(saved_hashes[(w_from, lib)],
                                             combine_hashes([r["hashes"] for r in per_rank]))
                        status = "state verified" if not bad else f"MISMATCH in {bad[:5]}"
                        if bad:
                            failures.append(f"load {w_from}->{w_to} {lib}: mismatch in "
                                            f"{len(bad)} entries, e.g. {bad[:5]}")
                    summary["verified"] = status
                    loads.setdefault((w_from, w_to, lib), []).append(summary)
                    line.append(f"{lib} {summary['seconds']:.2f}s (cpu {summary['cpu']:.2f}s), "
                                f"read {fmt_bytes(summary['bytes_read'])} for "
                                f"{fmt_bytes(summary['bytes_needed'])}, {status}")
                print(f"[rep {rep}] load {w_from}->{w_to}: " + "; ".join(line)
                      + f"  (group {time.perf_counter() - t0:.0f}s, load avg {loadavg()})",
                      flush=True)
            if not args.keep:
                shutil.rmtree(rep_dir, ignore_errors=True)
        raw_io("after")
    finally:
        if not args.keep:
            shutil.rmtree(root, ignore_errors=True)

    print(f"\nall phases: {time.perf_counter() - started:.0f}s wall; load average at end: "
          f"{loadavg()}\n")
    _report(args, state, dims, drop, saves, loads, total_bytes, info, cmd, raw)
    if not args.no_async:
        _async_sections(args, raw)
    if failures:
        print("\nFAILED: " + "; ".join(failures))
        return 1
    return 0


def _async_sections(args, raw: list[dict[str, float]]) -> None:
    """Stall of ``async_save`` vs ``save`` vs ``dcp.async_save`` and persist vs the raw write
    rates of this run (``async_save.py``), then training steps/s with an async save every K
    steps (``async_training.py``); each in its own groups."""
    import async_save  # noqa: PLC0415 - sibling benchmark modules
    import async_training  # noqa: PLC0415

    sizes = args.async_gb or [0.4, 2.0]
    best = max(x["bytes"] / min(x["write"], x["overwrite"]) for x in raw)
    print(f"\n## Async checkpoints (W=2; {', '.join(f'{g:g}' for g in sizes)} GB of state)\n",
          flush=True)
    rows = async_save.run(sizes, max(3, args.repeats), args.dir, write_rate=best)
    print()
    print(markdown_table(async_save.HEADERS, rows))
    print(f"\nStall: seconds the caller is blocked (max over ranks), median of "
          f"{max(3, args.repeats)}. Persist: write, fsync and commit (durable minus stall; all "
          f"of a sync save). Persist / raw overwrite: against the 'raw overwrite' case of the "
          "same rotation (each rank os.writes its tensors' bytes over an allocated file + "
          f"fsync). Best raw write in this run: {best / GB:.2f} GB/s (the raw I/O runs above: "
          "new file or overwrite, whichever was faster). elastic_ckpt keeps 1 (keep_last=1: after two "
          "untimed saves, every timed one overwrites recycled files), DCP writes a new "
          "directory per step (the older ones removed, untimed).\n", flush=True)
    rows = async_training.run(sizes, "blocks", 4, max(3, args.repeats), args.dir)
    print()
    print(markdown_table(async_training.HEADERS, rows))
    print("\nsteps/s: median over repeats of (steps / wall seconds, max over ranks); K = the "
          "steps that cover one persist (x1.25). process: the persist in a child process "
          "(benchmark-only; see async_training.py).")


def _summarize(per_rank: list[dict]) -> dict[str, Any]:
    """Max over ranks of the total and of each instrumented part; ``other`` is what the
    parts' maxima leave of the total (planning, collectives, metadata; >= 0)."""
    seconds = max(r["seconds"] for r in per_rank)
    keys = sorted({k for r in per_rank for k in r["parts"]})
    parts = {k: max(r["parts"].get(k, 0.0) for r in per_rank) for k in keys}
    parts["other"] = max(0.0, seconds - sum(parts.values()))
    return {"seconds": seconds, "parts": parts, "cpu": sum(r["cpu"] for r in per_rank),
            "dropped": any(r.get("dropped") for r in per_rank)}


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _report(args, state, dims, drop, saves, loads, total_bytes, info, cmd, raw) -> None:
    rows, detail = [], []
    # The fastest any writer can go on this disk: the best write+fsync rate of the raw runs
    # (a new file, or overwriting an allocated one, whichever was faster).
    write_rate = max(x["bytes"] / min(x["write"], x["overwrite"]) for x in raw)
    for w in SAVE_WORLDS:
        for kind, label in (("first", "new files"), ("steady", "steady")):
            e = _median(saves[(w, ELASTIC, kind)], "seconds")
            d = _median(saves[(w, DCP, kind)], "seconds")
            nbytes = total_bytes[w]
            floor = nbytes / write_rate / d
            if kind == "first":
                verdict = _save_verdict(e, d)
            else:
                verdict = ("yes" if e / d <= TARGET_STEADY_SAVE
                           else f"NO (> {TARGET_STEADY_SAVE}x)")
                if e / d > TARGET_STEADY_SAVE and floor > TARGET_STEADY_SAVE:
                    verdict += f"; unreachable here: disk floor is {floor:.2f}x DCP"
            rows.append([f"save W={w} {label}", f"{e:.2f}", f"{d:.2f}",
                         f"{nbytes / e / GB:.2f}", f"{nbytes / d / GB:.2f}", "-", "-",
                         f"{e / d:.2f}", f"{floor:.2f}", verdict])
            for lib in LIBS:
                detail.append(_detail_row(f"save W={w} {label}", lib, saves[(w, lib, kind)]))
    # The fastest any reader can go on this disk: the best cold sequential read rate measured
    # in this run (raw I/O, before and after). Only meaningful for cold (page cache dropped) loads.
    read_rate = max((x["bytes"] / x["read"] for x in raw), default=0.0) if drop else 0.0
    for w_from, w_to in LOAD_CASES:
        er, dr = loads[(w_from, w_to, ELASTIC)], loads[(w_from, w_to, DCP)]
        e, d = _median(er, "seconds"), _median(dr, "seconds")
        needed = er[-1]["bytes_needed"]
        e_amp = er[-1]["bytes_read"] / max(1, er[-1]["bytes_needed"])
        d_amp = dr[-1]["bytes_read"] / max(1, dr[-1]["bytes_needed"])
        floor_ratio = needed / read_rate / d if read_rate else None
        if w_from == w_to:  # no re-shard: the time target does not apply
            verdict = ("n/a (no re-shard)" if e_amp <= TARGET_AMP
                       else f"NO (amp > {TARGET_AMP})")
        else:
            misses = ([f"time > {TARGET_LOAD_RATIO}x"] if e / d > TARGET_LOAD_RATIO else []) \
                + ([f"amp > {TARGET_AMP}"] if e_amp > TARGET_AMP else [])
            verdict = "yes" if not misses else "NO (" + ", ".join(misses) + ")"
            if e / d > TARGET_LOAD_RATIO and floor_ratio and floor_ratio > TARGET_LOAD_RATIO:
                verdict += f"; unreachable here: disk floor is {floor_ratio:.2f}x DCP"
        rows.append([f"load {w_from}->{w_to}", f"{e:.2f}", f"{d:.2f}",
                     f"{needed / e / GB:.2f}", f"{dr[-1]['bytes_needed'] / d / GB:.2f}",
                     f"{e_amp:.4f}", f"{d_amp:.4f}", f"{e / d:.2f}",
                     f"{floor_ratio:.2f}" if floor_ratio else "-", verdict])
        for lib, runs in ((ELASTIC, er), (DCP, dr)):
            detail.append(_detail_row(f"load {w_from}->{w_to}", lib, runs))

    headers = ["case", "elastic_ckpt s", "DCP s", "elastic GB/s", "DCP GB/s",
               "elastic read amp", "DCP read amp", "elastic/DCP time", "disk floor/DCP",
               "target met"]
    print(f"## Checkpoint benchmark: {state}\n")
    print(f"`{cmd}` — {info['cores']} cores ({info['cpu']}), {info['ram']} RAM, "
          f"torch {info['torch']}, gloo, 1-D CPU mesh. Model {dims}; "
          f"{fmt_bytes(total_bytes[2])} of tensors. "
          + ("Page cache dropped before every timed load (cold reads); `sync` before every "
             "timed save." if drop else
             "Page cache NOT dropped: reads are warm-cache for both libraries.")
          + (f" Median of {args.repeats} repeats." if args.repeats > 1 else "") + "\n")
    print(markdown_table(headers, rows))
    print("\nSeconds: max over ranks from a common barrier. GB/s: tensor bytes saved (all "
          "ranks) or needed by the loading ranks / seconds. Read amp: bytes read from storage / "
          "bytes needed, summed over ranks (elastic_ckpt: `last_read_stats`; DCP: stored length "
          "of every item in each rank's read plan, which `FileSystemReader` reads whole). "
          "Disk floor/DCP: the lowest elastic/DCP time any reader could reach on this disk, "
          "i.e. (bytes needed / best cold sequential read rate of the raw I/O runs above) / "
          "DCP's time; every loaded byte must come off the disk once, but bytes two ranks "
          "read come off it only once, because ranks on one machine share its page cache. "
          "For saves: (bytes / best raw write+fsync rate, new file or overwrite) / DCP's time. "
          f"Saves: {args.saves} per library in a row; 'new files' is the first (both write new "
          f"files), 'steady' the median of saves {STEADY_FROM + 1}-{args.saves}, where "
          "elastic_ckpt (keep_last=1) overwrites the files retention recycled and DCP writes "
          "a new directory per step (the previous one removed, untimed).\n")
    print("### Where the time goes (max over ranks, seconds)\n")
    print(markdown_table(["case", "library", "total", "CPU s (all ranks)", "state_dict",
                          "write/read", "commit",
                          "set_state_dict", "other", "syscall read amp", "on disk",
                          "check"], detail))
    print("\nstate_dict / set_state_dict: `AppState` (get/set_state_dict). write/read: the "
          "storage writer's `write_data` (incl. fsync) / reader's `read_data`. commit: "
          "`finish` on the coordinator (metadata/manifest + marker). other: total minus the "
          "parts (planning, plan/metadata collectives, barriers). syscall read amp: "
          "`rchar` of all load ranks / bytes needed (includes metadata/manifest reads). CPU s: "
          "process CPU time (user+sys, all threads) during the timed call, summed over ranks: "
          "less sensitive than seconds to what else the machine is running.")


def _save_verdict(elastic_s: float, dcp_s: float) -> str:
    if elastic_s <= dcp_s:
        return "yes"
    if elastic_s <= dcp_s * (1 + SAVE_TIE):
        return f"tie (within {SAVE_TIE:.0%})"
    return "NO (slower than DCP)"


def _detail_row(case: str, lib: str, runs: list[dict]) -> list[str]:
    r = sorted(runs, key=lambda x: x["seconds"])[len(runs) // 2]
    p = r["parts"]

    def s(key: str) -> str:
        return f"{p[key]:.2f}" if key in p else "-"

    amp = (f"{r['rchar'] / max(1, r['bytes_needed']):.4f}" if "rchar" in r else "-")
    disk = fmt_bytes(r["disk_bytes"]) if "disk_bytes" in r else "-"
    return [case, lib, f"{r['seconds']:.2f}", f"{r['cpu']:.2f}", s("state_dict"), s("io"),
            s("commit"), s("set_state"), f"{p['other']:.2f}", amp, disk,
            r.get("verified", "-")]


if __name__ == "__main__":
    sys.exit(main())
