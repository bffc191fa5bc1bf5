"""Step-loop overhead: ``RankTrainer`` vs a plain hand-written FSDP2 loop, same work.

```
python benchmarks/step_loop.py                          # 2 gloo ranks, ~0.15 s/step, 2 cores
python benchmarks/step_loop.py --repeats 6 --steps 50   # tighter numbers
python benchmarks/step_loop.py --mode sequential        # whole loops, order alternating
python benchmarks/step_loop.py --d-model 256 --seq-len 128 --world-size 2 --mode separate
python benchmarks/step_loop.py --model hf                # an HF LlamaForCausalLM instead
```

``--model hf`` trains ``transformers``' ``LlamaForCausalLM`` (built from ``--d-model``,
``--layers``, ``--heads``, ``--vocab``, ``--seq-len``; untied head) through ``RankTrainer``'s
``default_parallelize`` (each decoder layer, the embedding and the head their own FSDP unit);
the plain loop ``fully_shard``s the same units by hand (``--units blocks``: both loops shard
only the decoder layers and the root). Both build the model
off meta from the same seed, so both start from the same weights. The run also prints the peak
*parameter* memory per rank of the elastic loop (sharded parameters plus whatever is gathered,
sampled at every module's forward and backward hooks) against ``full/W + 2 blocks``.

Both loops train the same GPT (``build_gpt``, same seed so the same initial weights) on the
same data (``SyntheticLMDataset`` through ``ElasticSampler`` and ``default_collate``) with the same
global batch, micro-batch, world size, AdamW settings, LR schedule (``lr_at``) and gradient
clipping (when the config has it):

* elastic: ``RankTrainer(cfg, ...).run()`` with checkpoints off (``interval_steps=None``,
  ``save_on_finish=False``, a temporary ``checkpoint.uri`` that stays empty).
* plain: what a careful user writes by hand: ``fully_shard`` each block and the root, AdamW,
  per pass of ``ElasticSampler.step_passes`` (the rank's micro-batches, then zero-weight filler
  passes so every rank runs as many) ``(loss * weight * sampler.loss_scale(W)).backward()``
  (``W / B``: FSDP averages over ranks, so this makes the gradient the mean over the global
  batch), ``clip_grad_norm_``, ``optimizer.step()``, ``zero_grad(set_to_none=True)``, then one
  blocking ``all_reduce`` of the summed loss and ``.item()`` to report it. The step arithmetic
  (passes, filler, loss scale) is the library's, the same RankTrainer uses.

Step time is measured the same way for both on rank 0: the wall time from the end of one step
to the end of the next (for the elastic loop, up to the ``on_step`` hook call, so anything
RankTrainer does between steps is counted). The first ``--warmup`` steps are excluded.
``--mode`` decides how the loops share the machine, so that noise lands on both equally:

* ``interleaved`` (default): one freshly spawned gloo group per repeat; RankTrainer runs, and
  its ``on_step`` hook runs one plain step after every elastic step. An elastic step is timed
  from the end of the previous hook to the start of the next (the plain step is not charged
  to it), a plain step over its own ``step()`` call; step k of both loops then ran back to
  back, and is also reported as a paired ratio. The fairest pairing when other work on the
  machine comes and goes within seconds (a shared box).
* ``sequential``: both whole loops one after the other in one group per repeat, the order
  alternating between repeats.
* ``separate``: each whole loop in its own spawned group, the order alternating.

The run also checks that both loops produce the same loss sequence (rtol ``--rtol``), so the
comparison is apples to apples, and exits non-zero when they do not.
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import banner, loadavg, markdown_table, run_group  # noqa: E402
from _configs import add_model_flags, train_config  # noqa: E402

LOOPS = ("elastic", "plain")
MODES = {
    "sequential": "both loops in one spawned group per repeat, order alternating",
    "separate": "each loop in its own spawned group, order alternating",
    "interleaved": "one group per repeat, a plain step after each elastic step",
}


# -- config -------------------------------------------------------------------------------------
def _config(o: argparse.Namespace, uri: str):
    """Both loops' config: the flags' model and data, checkpoints off (``uri`` stays empty)."""
    return train_config(
        o, seed=o.seed, kind=o.model,
        max_steps=o.warmup + o.steps,
        checkpoint={"uri": uri, "interval_steps": None, "save_on_finish": False},
        optim={"grad_clip_norm": o.grad_clip},
    )


def build_model(cfg):
    """The benchmark's model, built off meta from ``cfg.seed`` (both loops call this)."""
    from elastic_ckpt.train import build_gpt

    torch.manual_seed(cfg.seed)
    if cfg.model.kind == "gpt":
        return build_gpt(cfg.model)
    from elastic_ckpt.train.hf import hf_config
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(hf_config(cfg.model), attn_implementation="sdpa")


def _blocks(model):
    from elastic_ckpt.train import shard_units

    return shard_units(model)


def shard_by_hand(model, mesh, units: str) -> None:
    """The plain loop's sharding, written out: ``fully_shard`` each block; with ``default``
    also the input embedding and the output head (torchtitan's layout, and what
    ``default_parallelize`` does for an untied model); then the root."""
    from torch.distributed.fsdp import fully_shard

    for block in _blocks(model):
        fully_shard(block, mesh=mesh)
    if units == "default":
        for edge in (model.get_input_embeddings(), model.get_output_embeddings()):
            fully_shard(edge, mesh=mesh)
    fully_shard(model, mesh=mesh)


def _loss_fn(cfg):
    from elastic_ckpt.train import lm_loss
    from elastic_ckpt.train.hf import hf_lm_loss

    return lm_loss if cfg.model.kind == "gpt" else hf_lm_loss


class ParamMemory:
    """Peak bytes of parameters a rank holds (its shards plus every tensor FSDP has gathered
    at that moment), sampled in each module's forward pre/post and backward pre hooks until
    ``stop()`` (the sampling walks the whole model, so it is kept out of timed steps)."""

    def __init__(self, model) -> None:
        self.model = model
        # Outside forward/backward every parameter is its sharded DTensor (meta shapes do).
        self.shards = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
        self.peak = self.shards
        self.handles = []
        for m in model.modules():
            self.handles += [m.register_forward_pre_hook(lambda *a: self.sample()),
                             m.register_forward_hook(lambda *a: self.sample()),
                             m.register_full_backward_pre_hook(lambda *a: self.sample())]

    def sample(self) -> None:
        from torch.distributed.tensor import DTensor

        gathered = sum(p.numel() * p.element_size() for m in self.model.modules()
                       for p in m._parameters.values()
                       if p is not None and not isinstance(p, DTensor)
                       and p.untyped_storage().size())
        self.peak = max(self.peak, self.shards + gathered)

    def stop(self) -> None:
        for h in self.handles:
            h.remove()
        self.handles = []


def _dataset(cfg):
    from elastic_ckpt.data import SyntheticLMDataset

    ds = cfg.data.dataset
    return SyntheticLMDataset(ds.num_samples, ds.seq_len, ds.vocab_size, seed=cfg.data.seed)


# -- the two loops (run on every rank) ----------------------------------------------------------
class PlainLoop:
    """The hand-written FSDP2 loop, one ``step()`` at a time (so it can also be interleaved)."""

    def __init__(self, rank: int, world_size: int, cfg, units: str = "default") -> None:
        from torch.distributed.device_mesh import init_device_mesh

        from elastic_ckpt.data import ElasticSampler

        self.rank, self.world_size, self.cfg = rank, world_size, cfg
        model = build_model(cfg)  # same initial weights as RankTrainer
        self.loss_fn = _loss_fn(cfg)
        mesh = init_device_mesh("cpu", (world_size,))
        shard_by_hand(model, mesh, units)
        o = cfg.optim
        self.model = model
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas,
                                           weight_decay=o.weight_decay)
        self.dataset = _dataset(cfg)
        d = cfg.data
        self.sampler = ElasticSampler(len(self.dataset), d.global_batch_size, d.seed, d.shuffle)

    def step(self, step: int) -> float:
        from torch.utils.data import default_collate

        from elastic_ckpt.train import lr_at

        cfg, o, d = self.cfg, self.cfg.optim, self.cfg.data
        B, W = d.global_batch_size, self.world_size
        lr = lr_at(step, o, cfg.max_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        # Every rank runs the same number of passes (each all-gathers); a rank with a smaller
        # share ends with zero-weight ones. Scale W / B: FSDP averages over ranks.
        passes = self.sampler.step_passes(step, self.rank, W, d.micro_batch_size)
        scale = self.sampler.loss_scale(W)
        loss_sum = torch.zeros(())
        for ids, n in passes:
            batch = default_collate([self.dataset[int(j)] for j in ids])
            loss = self.loss_fn(self.model, batch)
            (loss * (n * scale)).backward()
            loss_sum += loss.detach() * n
        if o.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), o.grad_clip_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        dist.all_reduce(loss_sum)
        return loss_sum.item() / B


class _Record:
    """One loop's steps on this rank: wall and process-CPU clock at each step's start and end
    (a step starts where the previous one ended), loss, and RankTrainer's own step time."""

    def __init__(self) -> None:
        self.wall: list[tuple[float, float]] = []
        self.cpu: list[tuple[float, float]] = []
        self.loss: list[float] = []
        self.inner: list[float] = []
        self.last = (math.nan, math.nan)

    def mark(self, loss: float, begin: tuple[float, float] | None = None,
             inner: float = math.nan) -> None:
        """Close a step now; it began at ``begin`` (default: where the previous one ended)."""
        now = _clock()
        begin = self.last if begin is None else begin
        self.wall.append((begin[0], now[0]))
        self.cpu.append((begin[1], now[1]))
        self.loss.append(loss)
        self.inner.append(inner)
        self.last = now

    def result(self) -> dict[str, list]:
        return {"wall": self.wall, "cpu": self.cpu, "loss": self.loss, "inner": self.inner}


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


def _elastic_trainer(cfg, on_step, memory: list | None = None, cfg_units: str = "default"):
    import functools

    from elastic_ckpt.train import RankHooks, TrainJob, TrainSpec, default_parallelize

    def parallelize(model, mesh):
        if cfg_units == "blocks":  # a user parallelize_fn: the blocks and the root only
            shard_by_hand(model, mesh, "blocks")
        else:
            model = default_parallelize(model, mesh)
        if memory is not None:
            memory.append(ParamMemory(model))
        return model

    spec = TrainSpec(functools.partial(build_model, cfg), _loss_fn(cfg),
                     parallelize_fn=parallelize)
    job = TrainJob(cfg, spec, _dataset(cfg))
    return job.trainer(RankHooks(on_step=on_step), torch.device("cpu"))


def _run_elastic(rank: int, world_size: int, cfg, units: str) -> dict[str, list]:
    rec = _Record()
    dist.barrier()
    _elastic_trainer(cfg, lambda m: rec.mark(m.loss, inner=m.step_time_s),
                     cfg_units=units).run()
    return rec.result()


def _run_plain(rank: int, world_size: int, cfg, units: str) -> dict[str, list]:
    rec = _Record()
    dist.barrier()
    loop = PlainLoop(rank, world_size, cfg, units)
    for step in range(cfg.max_steps):
        rec.mark(loop.step(step))
    return rec.result()


def _run_interleaved(rank: int, world_size: int, cfg, units: str) -> dict[str, dict[str, list]]:
    """One plain step right after each elastic step, inside RankTrainer's ``on_step`` hook.
    Elastic step k is timed from the end of plain step k-1 to the start of hook k (everything
    RankTrainer does in between), the plain step over its own ``step()`` call."""
    e, p = _Record(), _Record()
    plain = PlainLoop(rank, world_size, cfg, units)
    memory: list[ParamMemory] = []

    def on_step(m) -> None:
        if memory:
            memory[0].stop()  # sampled during the first (untimed) step only
        e.mark(m.loss, begin=p.last, inner=m.step_time_s)
        begin = _clock()
        loss = plain.step(m.step - 1)
        p.mark(loss, begin=begin)

    dist.barrier()
    _elastic_trainer(cfg, on_step, memory, units).run()
    model = memory[0].model
    full = sum(p.numel() * p.element_size() for p in model.parameters())
    blocks = _blocks(model)
    block = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in blocks)
    mem = {"peak": memory[0].peak, "full": full, "block": block, "world_size": world_size}
    return {"elastic": e.result(), "plain": p.result(), "memory": mem}


def _group(rank: int, world_size: int, opts: argparse.Namespace, uri: str,
           order: list[str]) -> dict[str, Any] | None:
    import gc

    cfg = _config(opts, uri)
    out: dict[str, Any] = {}
    if order == ["interleaved"]:
        out.update(_run_interleaved(rank, world_size, cfg, opts.units))
    else:
        for name in order:
            gc.collect()
            run = _run_elastic if name == "elastic" else _run_plain
            out[name] = run(rank, world_size, cfg, opts.units)
    dist.barrier()
    return out if rank == 0 else None


# -- reporting ----------------------------------------------------------------------------------
def _intervals(rec: dict[str, list], warmup: int, clock: str = "wall") -> list[float]:
    return [e - b for b, e in rec[clock][warmup:]]


def _max_rel(a: list[float], b: list[float]) -> float:
    if len(a) != len(b):
        return math.inf
    return max((abs(x - y) / max(abs(y), 1e-30) for x, y in zip(a, b)), default=0.0)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--world-size", type=int, default=2)
    p.add_argument("--model", choices=("gpt", "hf"), default="gpt",
                   help="gpt: the built-in GPT; hf: transformers' LlamaForCausalLM")
    p.add_argument("--units", choices=("default", "blocks"), default="default",
                   help="FSDP units of both loops: default_parallelize's (blocks, embedding, "
                        "head, root) or blocks and root only (elastic through a parallelize_fn)")
    add_model_flags(p, global_batch=32, micro_batch=8, num_samples=4096)
    p.add_argument("--grad-clip", type=float, default=1.0,
                   help="grad_clip_norm in the config (<= 0: no clipping)")
    p.add_argument("--steps", type=int, default=30, help="timed steps per loop and repeat")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps first (>= 1)")
    p.add_argument("--repeats", type=int, default=4,
                   help="spawned groups (pairs of groups with --mode separate); the loop "
                        "order alternates between them")
    p.add_argument("--mode", choices=MODES, default="interleaved",
                   help="sequential: both loops one after the other in one group per repeat; "
                        "separate: each loop in its own group; interleaved: one plain step "
                        "after each elastic step in one group (fairest on a noisy machine)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch threads per rank (default: cores // world size)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rtol", type=float, default=1e-4)
    o = p.parse_args(argv)
    if o.warmup < 1 or o.steps < 1 or o.repeats < 1:
        p.error("--warmup, --steps and --repeats must be >= 1")
    o.grad_clip = o.grad_clip if o.grad_clip > 0 else None

    threads = o.threads or max(1, (os.cpu_count() or 1) // o.world_size)
    tokens_per_step = o.global_batch * o.seq_len
    params = math.nan
    try:
        params = sum(p.numel() for p in build_model(_config(o, "/nonexistent")).parameters())
    except Exception:  # noqa: BLE001 -- informational only
        pass
    banner(__file__, argv)
    name = "GPT" if o.model == "gpt" else "HF LlamaForCausalLM"
    print(f"setup: {o.world_size} gloo ranks x {threads} thread(s), {name} d_model={o.d_model} "
          f"layers={o.layers} heads={o.heads} vocab={o.vocab} seq={o.seq_len} "
          f"({params / 1e6:.2f} M params), global batch {o.global_batch}, micro-batch "
          f"{o.micro_batch}, grad clip {o.grad_clip}; {o.warmup} warm-up + {o.steps} timed "
          f"steps x {o.repeats} repeats, mode {o.mode} ({MODES[o.mode]})")
    busy = os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0
    if busy > 0.5 * (os.cpu_count() or 1):
        print(f"note: the machine is busy (1-min load {busy:.1f} on {os.cpu_count()} cores); "
              "step times are noisy, the paired and CPU-time numbers are the steadier ones")

    runs: list[dict[str, Any]] = []
    for r in range(o.repeats):
        order = list(LOOPS) if r % 2 == 0 else list(reversed(LOOPS))
        if o.mode == "interleaved":
            order = ["interleaved"]
        uri = tempfile.mkdtemp(prefix="step_loop_ckpt_")
        try:
            t0 = time.perf_counter()
            if o.mode == "separate":
                res: dict[str, Any] = {}
                for name in order:
                    res.update(run_group(o.world_size, _group, o, uri, [name],
                                         threads_per_rank=threads)[0])
            else:
                res = run_group(o.world_size, _group, o, uri, order,
                                threads_per_rank=threads)[0]
            leftover = os.listdir(uri)
        finally:
            shutil.rmtree(uri, ignore_errors=True)
        if leftover:
            print(f"warning: the elastic loop wrote {leftover} to its checkpoint uri")
        runs.append(res)
        iv = {n: statistics.median(_intervals(res[n], o.warmup)) for n in LOOPS}
        label = "elastic, plain, elastic, ... step by step" if o.mode == "interleaved" \
            else " then ".join(order)
        print(f"  repeat {r + 1}/{o.repeats} ({label}, "
              f"{time.perf_counter() - t0:.1f} s): median step "
              + ", ".join(f"{n} {iv[n] * 1e3:.1f} ms" for n in LOOPS), flush=True)

    # Loss sequences: elastic vs plain in every repeat, and every repeat vs the first.
    ref = runs[0]["plain"]["loss"]
    worst_pair = max(_max_rel(run["elastic"]["loss"], run["plain"]["loss"]) for run in runs)
    worst_repeat = max(_max_rel(run[n]["loss"], ref) for run in runs for n in LOOPS)
    same = worst_pair <= o.rtol and worst_repeat <= o.rtol

    # Throughput from pooled step intervals over all repeats.
    pooled = {n: [x for run in runs for x in _intervals(run[n], o.warmup)] for n in LOOPS}
    stats = {}
    for n in LOOPS:
        xs = pooled[n]
        mean, med = statistics.fmean(xs), statistics.median(xs)
        stats[n] = {"mean": mean, "median": med, "p90": sorted(xs)[int(0.9 * (len(xs) - 1))],
                    "sps": 1.0 / mean}
    rows = []
    for n in LOOPS:
        s = stats[n]
        rows.append([n, f"{s['median'] * 1e3:.1f}", f"{s['mean'] * 1e3:.1f}",
                     f"{s['p90'] * 1e3:.1f}", f"{s['sps']:.2f}",
                     f"{s['sps'] * o.global_batch:.1f}", f"{s['sps'] * tokens_per_step:,.0f}"])
    print()
    print(markdown_table(["loop", "median step ms", "mean step ms", "p90 step ms", "steps/s",
                          "samples/s", "tokens/s"], rows))
    ratio_mean = stats["elastic"]["sps"] / stats["plain"]["sps"]
    ratio_median = stats["plain"]["median"] / stats["elastic"]["median"]
    per_repeat = [statistics.fmean(_intervals(run["plain"], o.warmup))
                  / statistics.fmean(_intervals(run["elastic"], o.warmup)) for run in runs]
    goal = 0.98 if o.model == "hf" else 0.97
    verdict = "meets" if ratio_mean >= goal else "MISSES"
    print()
    print(f"throughput ratio elastic/plain: {ratio_mean:.3f} (from mean step time; "
          f"{verdict} the >= {goal} goal), {ratio_median:.3f} from median step time; "
          f"per repeat: {', '.join(f'{x:.3f}' for x in per_repeat)}")
    if o.mode == "interleaved":  # step k of both loops ran back to back: pair them
        paired = [p / e for run in runs for e, p in zip(_intervals(run["elastic"], o.warmup),
                                                        _intervals(run["plain"], o.warmup))]
        q = statistics.quantiles(paired, n=4) if len(paired) > 1 else [paired[0]] * 3
        print(f"paired per-step ratio plain/elastic time: median {q[1]:.3f} "
              f"(quartiles {q[0]:.3f} .. {q[2]:.3f}, {len(paired)} pairs)")
    inner = [x for run in runs for x in run["elastic"]["inner"][o.warmup:]]
    if inner and not any(math.isnan(x) for x in inner):
        outside = stats["elastic"]["mean"] - statistics.fmean(inner)
        print(f"elastic: RankTrainer's own step_time_s mean {statistics.fmean(inner) * 1e3:.1f} "
              f"ms; outside that window (run() bookkeeping, _train_step frame teardown, hook "
              f"call) {outside * 1e3:+.2f} ms/step")
    cpu = {n: statistics.fmean(x for run in runs for x in _intervals(run[n], o.warmup, "cpu"))
           for n in LOOPS}
    print(f"process CPU time per step on rank 0 (less sensitive to other load): elastic "
          f"{cpu['elastic'] * 1e3:.1f} ms, plain {cpu['plain'] * 1e3:.1f} ms, "
          f"plain/elastic {cpu['plain'] / cpu['elastic']:.3f}")
    print(f"loss sequences ({o.warmup + o.steps} steps, all repeats): "
          + ("the same" if same else "DIFFERENT")
          + f" within rtol {o.rtol:g} (max rel diff elastic vs plain {worst_pair:.2e}, across "
          f"repeats {worst_repeat:.2e}); first/last loss {ref[0]:.4f} / {ref[-1]:.4f}")
    mems = [run["memory"] for run in runs if "memory" in run]
    if mems:
        m = mems[0]
        budget = m["full"] / m["world_size"] + 2 * m["block"]
        print(f"peak parameter memory per rank (elastic, rank 0): {m['peak'] / 1e6:.2f} MB; "
              f"full model {m['full'] / 1e6:.2f} MB, full/W + 2 blocks {budget / 1e6:.2f} MB "
              f"(ratio {m['peak'] / budget:.2f}; "
              + ("below" if m["peak"] < budget else "ABOVE") + " the budget)")
    print(f"load average at end {loadavg()}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
