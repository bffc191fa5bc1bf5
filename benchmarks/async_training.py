"""Training with async checkpoints: steps/s with an async save every K steps vs no checkpoints,
and the background persist on a thread (the library's) vs in a separate process.

```
python benchmarks/async_training.py                 # 0.4 GB and 2 GB of state, W=2
python benchmarks/async_training.py --gb 0.4 --saves 4
```

Per size, in one freshly spawned gloo group (W=2, the FSDP2 model of ``checkpoint.py``, AdamW),
after warm-up steps and two untimed saves (staging buffers allocated, recycled files in the
pool), it measures one step and one persist and sets K = the steps that cover one persist
(x1.25, at least 2). Then three cases, each ``--saves`` x K steps, in alternating order:

* ``none``: no checkpoints;
* ``thread``: ``CheckpointManager.async_save`` every K steps (the library: persist and commit
  on the manager's background thread);
* ``overlap``: the same with ``overlap_staging=True`` (the trainer's default): the sharded
  state is copied during the next step's forward/backward, whose ``optimizer.step`` waits on
  ``handle.wait_staged()``; its stall is the return time plus that wait;
* ``process``: the same staging copy every K steps into host buffers in shared memory
  (``/dev/shm``), and the same ``write_rank_file`` (block checksums, fsync, recycled files) run
  by a child process: what moving the persist out of the training process's GIL buys. It
  skips DCP planning and the commit markers (the library pays those on the caller's thread and
  in a few small files), so it flatters the process a little.

Reported: steps/s of each case, its ratio to ``none``, the stall per save (caller blocked) and
the persist time. The goal (issue 10): steps/s >= 0.95x of no checkpoints once K steps cover
one persist.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import banner, loadavg, markdown_table, run_group  # noqa: E402
from _models import build, local_tensors, model_dims, train_step  # noqa: E402

from elastic_ckpt.checkpoint import AppState, CheckpointManager  # noqa: E402

CASES = ("none", "thread", "overlap", "process")
GOAL = 0.95

_CHILD = textwrap.dedent("""
    import json, os, sys, time, warnings
    import numpy as np, torch
    warnings.filterwarnings("ignore", message="The given buffer is not writable")  # read-only
    from torch.distributed.checkpoint.metadata import MetadataIndex
    from elastic_ckpt.checkpoint.manifest import rank_filename, step_dirname
    from elastic_ckpt.checkpoint.recycle import FilePool
    from elastic_ckpt.checkpoint.writer import write_rank_file
    from elastic_ckpt.storage import Storage
    spec = json.loads(sys.stdin.readline())
    mem = np.memmap(spec["shm"], dtype=np.uint8, mode="r")
    chunks = []
    for fqn, offset, nbytes, dtype, shape in spec["tensors"]:
        t = torch.frombuffer(mem, dtype=getattr(torch, dtype), count=nbytes // getattr(
            torch, dtype).itemsize, offset=offset).view(shape)
        chunks.append((MetadataIndex(fqn), t, (None, None, None)))
    root = Storage(spec["root"]); pool = FilePool(root); rank = spec["rank"]
    print("ready", flush=True)
    for line in sys.stdin:
        step = json.loads(line)["step"]
        t0 = time.perf_counter()
        name = step_dirname(step)
        root.makedirs(name)
        write_rank_file(root.child(name), rank, rank_filename(rank), chunks, 1 << 15, pool=pool,
                        checksum_during_fsync=True)
        old = step_dirname(step - 2)  # keep two, recycle the rest (as keep_last=2)
        if root.exists(old):
            pool.donate(old, step - 2)
            root.remove_tree(old)
        print(json.dumps({"persist_s": time.perf_counter() - t0}), flush=True)
""")


class ProcessPersister:
    """Stages this rank's tensors into one shared-memory file and has a child process write
    them (benchmark-only; see the module docstring)."""

    def __init__(self, app: AppState, root: str, rank: int) -> None:
        tensors = local_tensors(app)
        total = sum(t.nbytes for _, t in tensors)
        self.shm = f"/dev/shm/ckpt-bench-{os.getpid()}-{rank}"
        self.mem = np.memmap(self.shm, dtype=np.uint8, mode="w+", shape=(max(1, total),))
        self.views, spec, offset = [], [], 0
        for fqn, t in tensors:
            view = torch.frombuffer(self.mem, dtype=t.dtype, count=t.numel(),
                                    offset=offset).view(t.shape)
            self.views.append(view)
            spec.append([fqn, offset, t.nbytes, str(t.dtype).split(".")[-1], list(t.shape)])
            offset += t.nbytes
        self.app = app
        self.child = subprocess.Popen([sys.executable, "-c", _CHILD], stdin=subprocess.PIPE,
                                      stdout=subprocess.PIPE, text=True)
        self.child.stdin.write(json.dumps({"shm": self.shm, "tensors": spec, "root": root,
                                           "rank": rank}) + "\n")
        self.child.stdin.flush()
        assert self.child.stdout.readline().strip() == "ready"
        os.remove(self.shm)  # both have it mapped; the memory goes when both exit
        self.pending = False
        self.persist_s: list[float] = []

    def save(self, step: int) -> None:
        self.wait()
        for view, (_, t) in zip(self.views, local_tensors(self.app)):
            view.copy_(t.detach())
        self.child.stdin.write(json.dumps({"step": step}) + "\n")
        self.child.stdin.flush()
        self.pending = True

    def wait(self) -> None:
        if self.pending:
            self.persist_s.append(json.loads(self.child.stdout.readline())["persist_s"])
            self.pending = False

    def close(self) -> None:
        self.wait()
        self.child.stdin.close()
        self.child.wait(60)


def _steps(model, optimizer, dims, n: int, every: int | None, save, tokens: int,
           fence=None) -> tuple[float, list]:
    """Wall seconds of ``n`` steps (barrier-aligned), saving after every ``every``-th;
    ``fence()`` runs before each ``optimizer.step`` and returns the seconds it blocked."""
    stalls = []
    fenced = [0.0]

    def before_step() -> None:
        fenced[0] += fence()

    dist.barrier()
    t0 = time.perf_counter()
    for i in range(1, n + 1):
        train_step(model, optimizer, dims, tokens=tokens,
                   before_step=before_step if fence else None)
        if every and i % every == 0:
            if stalls:
                stalls[-1] += fenced[0]
            fenced[0] = 0.0
            s0 = time.perf_counter()
            save()
            stalls.append(time.perf_counter() - s0)
    if stalls:
        stalls[-1] += fenced[0]
    dist.barrier()
    return time.perf_counter() - t0, stalls


def phase(rank: int, world_size: int, cfg: dict[str, Any]) -> dict[str, Any]:
    dims = model_dims(cfg["gb"], cfg["shape"])
    model, optimizer = build(world_size, dims, seed=0)
    app = AppState(model, optimizer)
    root = cfg["dir"]
    mgr = CheckpointManager(os.path.join(root, "thread"), keep_last=2)
    handles: list = []

    tokens = cfg["tokens"]

    def thread_save() -> None:
        handles.append(mgr.async_save(len(handles) + 1, {"app": app}))

    def overlap_save() -> None:
        handles.append(mgr.async_save(len(handles) + 1, {"app": app}, overlap_staging=True))

    for _ in range(3):  # warm-up (creates the AdamW state)
        train_step(model, optimizer, dims, tokens=tokens)
    for _ in range(3):  # staging buffers allocated; from the third save on, files recycle
        thread_save()
        mgr.wait()
    step_s, _ = _steps(model, optimizer, dims, 3, None, None, tokens)
    step_s /= 3
    thread_save()
    persist = mgr.wait().persist_s  # a recycled persist, as in the timed cases
    k = max(2, math.ceil(1.25 * persist / step_s))
    k = int(_agree(k))
    os.makedirs(os.path.join(root, "process"), exist_ok=True)
    persister = ProcessPersister(app, os.path.join(root, "process"), rank)
    proc_counter = {"step": 0}

    def process_save() -> None:
        proc_counter["step"] += 1
        persister.save(proc_counter["step"])

    for _ in range(2):  # the child's first writes: new files, then recycled
        process_save()
        persister.wait()
    persister.persist_s.clear()
    timed_from = len(handles)
    n = k * cfg["saves"]
    out: dict[str, Any] = {"k": k, "step_s": step_s, "n": n, "cases": {}}
    for r in range(cfg["repeats"]):
        order = CASES if r % 2 == 0 else CASES[::-1]
        for case in order:
            if case == "none":
                wall, stalls = _steps(model, optimizer, dims, n, None, None, tokens)
            elif case == "thread":
                wall, stalls = _steps(model, optimizer, dims, n, k, thread_save, tokens)
                mgr.wait()
            elif case == "overlap":
                first = len(handles)
                wall, stalls = _steps(model, optimizer, dims, n, k, overlap_save, tokens,
                                      fence=mgr.wait_staged)
                mgr.wait()
                out.setdefault("overlap_handles", []).extend(range(first, len(handles)))
            else:
                wall, stalls = _steps(model, optimizer, dims, n, k, process_save, tokens)
                persister.wait()
            rec = out["cases"].setdefault(case, {"wall": [], "stall": []})
            rec["wall"].append(wall)
            rec["stall"] += stalls
    out["process_persist_s"] = list(persister.persist_s)
    mgr.wait()
    overlapped = set(out.pop("overlap_handles", []))
    out["thread_persist_s"] = [h.persist_s for i, h in enumerate(handles)
                               if i >= timed_from and i not in overlapped]
    out["overlap_persist_s"] = [handles[i].persist_s for i in sorted(overlapped)]
    persister.close()
    return out


def _agree(value: float) -> float:
    """The max over ranks (every rank must save at the same steps)."""
    t = torch.tensor([float(value)])
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def run(sizes: list[float], shape: str, saves: int, repeats: int, parent: str | None,
        tokens: int = 16) -> list[list[str]]:
    """Every size; returns the table rows (also used by ``checkpoint.py``)."""
    rows = []
    for gb in sizes:
        root = tempfile.mkdtemp(prefix="async-train-", dir=parent)
        try:
            res = run_group(2, phase, {"gb": gb, "shape": shape, "dir": root,
                                       "saves": saves, "repeats": repeats,
                                       "tokens": tokens})
        finally:
            shutil.rmtree(root, ignore_errors=True)
        r0 = res[0]
        n, k = r0["n"], r0["k"]
        walls = {c: statistics.median(max(r["cases"][c]["wall"][i] for r in res)
                                      for i in range(repeats)) for c in CASES}
        base = n / walls["none"]
        dims = model_dims(gb, shape)
        for case in CASES:
            rate = n / walls[case]
            stalls = [s for r in res for s in r["cases"][case]["stall"]]
            times = [p for r in res for p in r.get(f"{case}_persist_s", [])]
            persist = f"{statistics.median(times):.2f}" if times else "-"
            ratio = rate / base
            verdict = "-" if case == "none" else ("yes" if ratio >= GOAL else "NO")
            rows.append([_size(dims, gb), case, f"{k}", f"{rate:.2f}", f"{ratio:.3f}",
                         f"{statistics.median(stalls):.3f}" if stalls else "-", persist,
                         verdict])
        print(f"{_size(dims, gb)}: one step ({tokens} tokens per rank) {r0['step_s']:.3f}s, "
              f"K={k}, {n} steps per case, "
              f"load avg {loadavg()}", flush=True)
    return rows


HEADERS = ["state", "case", "K", "steps/s", "vs none", "stall/save s", "persist s",
           f">= {GOAL}x"]


def _size(dims: dict[str, Any], gb: float) -> str:
    return "linear8 0.40 GB" if dims["shape"] == "linear8" else f"{gb:.2f} GB"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, action="append",
                    help="state size in GB (repeatable; default 0.4 and 2)")
    ap.add_argument("--shape", choices=("blocks", "linear8"), default="blocks")
    ap.add_argument("--saves", type=int, default=4, help="saves per timed case (4)")
    ap.add_argument("--repeats", type=int, default=3, help="repeats of each case (3)")
    ap.add_argument("--dir", default=None, help="where checkpoints go (default: a temp dir)")
    ap.add_argument("--tokens", type=int, default=16,
                    help="tokens per rank per training step (16: a step far shorter than a "
                         "persist)")
    args = ap.parse_args(argv)
    banner(__file__, argv, storage=args.dir or tempfile.gettempdir())
    rows = run(args.gb or [0.4, 2.0], args.shape, args.saves, args.repeats, args.dir,
               tokens=args.tokens)
    print(f"\nW=2, medians of {args.repeats} (max over ranks); load average {loadavg()}\n")
    print(markdown_table(HEADERS, rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
