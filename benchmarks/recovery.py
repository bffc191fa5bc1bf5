"""Recovery latency: ``ElasticTrainer`` vs Ray Train v2's elastic ``TorchTrainer``, same model.

```
python benchmarks/recovery.py                                  # both systems, ~5 min on 2 cores
python benchmarks/recovery.py --only elastic_ckpt              # ~2 min
python benchmarks/recovery.py --ckpt-interval 10 --steps 400 --d-model 128 --n-layers 4
python benchmarks/recovery.py --ray-resize-interval-s 5        # Ray Train tuned, not its default
```

Both systems run on the same kind of local multi-node cluster (``ray.cluster_utils.Cluster``:
a head node with 0 CPUs, ``--nodes`` worker nodes with 1 CPU each, everything on 127.0.0.1; a
fresh cluster per system) and train the same GPT (``build_gpt``) on the same data
(``SyntheticLMDataset`` through ``ElasticSampler``, sample-weighted micro-batches, AdamW, the
same LR schedule and gradient clipping), FSDP2 (``fully_shard`` per block + root) on gloo, with
1 to ``--nodes + 1`` workers. Each run goes through the same script:

1. train at ``--nodes`` workers until step ``--fail-at-step`` is observed;
2. node loss: ``cluster.remove_node`` (``--kill graceful``, Ray's default: SIGTERM, the raylet
   unregisters; ``--kill hard``: SIGKILL) of a node hosting a worker;
3. ``--settle-s`` seconds after the first step at the smaller size, capacity added: two
   ``cluster.add_node`` calls, one after the other (each returns once its node is up);
4. wait for the first step at the full size, then let the run finish.

Measured (the external clock, the same for both): wall time from ``remove_node`` returning
(a) and from the second ``add_node`` returning (b) to the first step at the new world size.

* ElasticTrainer: steps as seen by the driver through ``on_progress`` (``fit()`` polls the
  coordinator every <= 0.5 s, so this includes up to ~0.5 s of display latency; the event's
  own ``total_s``, from detection to the coordinator seeing the first step, is printed
  beside it), ``steps_lost`` and per-phase seconds from ``Result.events``.
* Ray Train v2 (``RAY_TRAIN_V2_ENABLED=1``; ``ScalingConfig(num_workers=(1, N + 1))`` is its
  elastic mode in this Ray version: ``ElasticScalingPolicy``, which sizes a (re)started group
  from the resources the AutoscalingCoordinator reports and, while a group runs, checks for a
  resize every ``elastic_resize_monitor_interval_s``, 60 s by default). The training function
  restores with ``ray.train.get_checkpoint()`` + ``dcp.load``, saves a DCP checkpoint every
  ``--ckpt-interval`` steps through ``ray.train.report(metrics, checkpoint=...)``, and rank 0
  appends every step (step, world size, worker-side timestamp taken right after the step) to a
  JSONL file that the driver tails. So Ray Train's times carry no display latency. By default
  ``ray.train.report`` is called with each checkpoint only: Ray's controller takes reports off
  a queue of one every 2 s (its health-check interval), so a report on every step throttles the
  loop to ~0.5 steps/s (``--ray-report-every-step`` shows it). Steps lost: the last step the
  previous group completed minus the step the new group resumed from. Phases (worker clock):
  event -> training function entered (detection, teardown, scheduling, worker start, process
  group), -> built (model + ``fully_shard``), -> restored (``get_checkpoint`` + ``dcp.load``),
  -> first step. Ray Train needs ``FailureConfig(max_failures=...)`` > 0 (its default, 0, ends
  the run at the first node loss); ``--ray-max-failures`` sets it. Its scale-up waits for the
  next resize check (``--ray-resize-interval-s``; default: Ray's own). It trains until the
  driver has measured both events, then stops at the next step boundary (a stop file, agreed
  on by an all-reduce); ElasticTrainer runs to ``--steps``.

Not a test: nothing asserts a timing. The machine is shared and has 2 cores; read the ratios.
"""

from __future__ import annotations

import os

# Before ray is imported: every node binds/advertises 127.0.0.1; Ray Train v2 is opt-in here.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ["RAY_TRAIN_V2_ENABLED"] = "1"

import argparse  # noqa: E402
import dataclasses  # noqa: E402
import json  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from typing import Any, Callable  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import banner, loadavg, markdown_table  # noqa: E402
from _configs import add_model_flags, train_config  # noqa: E402

from elastic_ckpt.config.schema import ScalingConfig  # noqa: E402
from elastic_ckpt.train.events import Phase  # noqa: E402

SYSTEMS = ("elastic_ckpt", "ray_train")
WAIT_TIMEOUT_S = 240.0


# -- config shared by both systems ----------------------------------------------------------------
def make_config(o: argparse.Namespace, workdir: str):
    return train_config(
        o, seed=0,
        max_steps=o.steps,
        scaling={"min_workers": 1, "max_workers": o.nodes + 1, "cooldown_s": o.cooldown_s,
                 "settle_s": o.scaling_settle_s},
        checkpoint={"uri": os.path.join(workdir, "ckpt"), "interval_steps": o.ckpt_interval,
                    "keep_last": 3, "memory_tier": o.memory_tier,
                    "memory_interval_steps": o.memory_interval},
        run_dir=os.path.join(workdir, "run"),
    )


@dataclasses.dataclass
class Obs:
    t: float
    step: int
    world_size: int


# -- ElasticTrainer ------------------------------------------------------------------------------
class ElasticRun:
    """``ElasticTrainer.fit()`` on a thread; steps observed through ``on_progress``."""

    name = "elastic_ckpt"

    def __init__(self, cfg) -> None:
        self.cfg = cfg
        self.obs: list[Obs] = []
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._fit, daemon=True)

    def _on_progress(self, progress) -> None:
        now = time.time()
        for m in progress.steps:
            self.obs.append(Obs(now, m.step, m.world_size))
        for e in progress.events:
            print(f"  [elastic_ckpt] event {e.kind} {e.from_workers}->{e.to_workers} "
                  f"total {e.total_s:.2f}s", flush=True)

    def _fit(self) -> None:
        from elastic_ckpt import ElasticTrainer

        try:
            self.result = ElasticTrainer(config=self.cfg, on_progress=self._on_progress).fit()
        except BaseException as exc:  # reported by the driver
            self.error = exc

    def start(self) -> None:
        self.thread.start()

    def request_stop(self) -> None:
        pass  # runs to max_steps

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)


# -- Ray Train v2 ---------------------------------------------------------------------------------
def ray_train_loop(loop_config: dict) -> None:
    """Ray Train worker function: the same step as ``RankTrainer`` (sample-weighted micro-batches
    over ``ElasticSampler.step_passes``), DCP checkpoints through ``ray.train.report``."""
    import ray.train
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

    from elastic_ckpt.config import TrainConfig
    from elastic_ckpt.data import ElasticSampler, SyntheticLMDataset, collate, fetch
    from elastic_ckpt.train import build_gpt, default_parallelize, device_mesh, lm_loss, lr_at

    t_enter = time.time()
    cfg = TrainConfig.model_validate(loop_config["config"])
    progress_path, stop_path = loop_config["progress_path"], loop_config["stop_path"]
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(1)  # one CPU per worker, as ElasticTrainer's TrainWorker does

    def log(record: dict) -> None:
        if rank == 0:
            with open(progress_path, "a") as f:
                f.write(json.dumps(record) + "\n")

    torch.manual_seed(cfg.seed)
    model = default_parallelize(build_gpt(cfg.model), device_mesh(torch.device("cpu")))
    o, d = cfg.optim, cfg.data
    optimizer = torch.optim.AdamW(model.parameters(), lr=o.lr, betas=o.betas,
                                  weight_decay=o.weight_decay)
    ds = d.dataset
    dataset = SyntheticLMDataset(ds.num_samples, ds.seq_len, ds.vocab_size, seed=cfg.seed)
    sampler = ElasticSampler(len(dataset), d.global_batch_size, d.seed, d.shuffle)
    t_built = time.time()
    step = 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as path:
            model_sd, optim_sd = get_state_dict(model, optimizer)
            state = {"model": model_sd, "optim": optim_sd}
            dcp.load(state, checkpoint_id=path)
            set_state_dict(model, optimizer, model_state_dict=state["model"],
                           optim_state_dict=state["optim"])
            with open(os.path.join(path, "trainer.json")) as f:
                step = json.load(f)["step"]
    log({"kind": "start", "world_size": world, "restored": step if checkpoint else None,
         "t_enter": t_enter, "t_built": t_built, "t_restored": time.time()})

    scale = sampler.loss_scale(world)
    while step < loop_config["max_steps"]:
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, o, cfg.max_steps)
        loss_sum = torch.zeros((), dtype=torch.float64)
        for ids, weight in sampler.step_passes(step, rank, world, d.micro_batch_size):
            loss = lm_loss(model, collate(fetch(dataset, ids)))
            (loss * (weight * scale)).backward()
            loss_sum += loss.detach().double() * weight
        if o.grad_clip_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip_norm)
        stop = 1.0 if rank == 0 and os.path.exists(stop_path) else 0.0
        stats = torch.stack([loss_sum, torch.tensor(stop, dtype=torch.float64)])
        dist.all_reduce(stats)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        step += 1
        metrics = {"step": step, "loss": stats[0].item() / d.global_batch_size,
                   "world_size": world, "t": time.time()}
        log({"kind": "step", **metrics})
        if step % cfg.checkpoint.interval_steps == 0:
            with tempfile.TemporaryDirectory() as tmp:
                model_sd, optim_sd = get_state_dict(model, optimizer)
                dcp.save({"model": model_sd, "optim": optim_sd}, checkpoint_id=tmp)
                if rank == 0:
                    with open(os.path.join(tmp, "trainer.json"), "w") as f:
                        json.dump({"step": step}, f)
                ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp))
        elif loop_config["report_every_step"]:
            ray.train.report(metrics)
        if stats[1].item() > 0:
            break


class RayTrainRun:
    """``TorchTrainer.fit()`` (Ray Train v2, elastic) on a thread; reports tailed from a file."""

    name = "ray_train"

    def __init__(self, cfg, o: argparse.Namespace, workdir: str) -> None:
        self.cfg, self.o, self.workdir = cfg, o, workdir
        self.progress_path = os.path.join(workdir, "ray_progress.jsonl")
        self.stop_path = os.path.join(workdir, "ray_stop")
        self.obs: list[Obs] = []
        self.starts: list[dict] = []
        self.result = None
        self.error: BaseException | None = None
        self._done = threading.Event()
        self.thread = threading.Thread(target=self._fit, daemon=True)
        self.tailer = threading.Thread(target=self._tail, daemon=True)

    def _fit(self) -> None:
        from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchTrainer

        o = self.o
        try:
            trainer = TorchTrainer(
                ray_train_loop,
                train_loop_config={"config": self.cfg.model_dump(mode="json"),
                                   "progress_path": self.progress_path,
                                   "stop_path": self.stop_path, "max_steps": 1_000_000,
                                   "report_every_step": o.ray_report_every_step},
                scaling_config=ScalingConfig(
                    num_workers=(1, o.nodes + 1), resources_per_worker={"CPU": 1},
                    use_gpu=False,
                    **({} if o.ray_resize_interval_s is None else
                       {"elastic_resize_monitor_interval_s": o.ray_resize_interval_s})),
                run_config=RunConfig(
                    name="recovery", storage_path=os.path.join(self.workdir, "ray_storage"),
                    failure_config=FailureConfig(max_failures=o.ray_max_failures),
                    checkpoint_config=CheckpointConfig(num_to_keep=3)))
            self.result = trainer.fit()
        except BaseException as exc:
            self.error = exc
        finally:
            self._done.set()

    def _tail(self) -> None:
        offset = 0
        while True:
            done = self._done.is_set()
            if os.path.exists(self.progress_path):
                with open(self.progress_path) as f:
                    f.seek(offset)
                    chunk = f.read()
                complete = chunk[:chunk.rfind("\n") + 1]
                offset += len(complete)
                for line in complete.splitlines():
                    rec = json.loads(line)
                    if rec["kind"] == "step":
                        self.obs.append(Obs(rec["t"], rec["step"], rec["world_size"]))
                    else:
                        self.starts.append(rec)
                        print(f"  [ray_train] group of {rec['world_size']} started, resumed "
                              f"from step {rec['restored']}", flush=True)
            if done:
                return
            time.sleep(0.05)

    def start(self) -> None:
        self.thread.start()
        self.tailer.start()

    def request_stop(self) -> None:
        with open(self.stop_path, "w"):
            pass

    def join(self, timeout_s: float) -> None:
        self.thread.join(timeout_s)
        self.tailer.join(5)


# -- the scenario --------------------------------------------------------------------------------
class ScenarioError(Exception):
    pass


def wait_for(run, pred: Callable[[], Any], what: str, timeout_s: float = WAIT_TIMEOUT_S) -> Any:
    deadline = time.time() + timeout_s
    while True:
        value = pred()
        if value:
            return value
        if not run.thread.is_alive():
            raise ScenarioError(f"{run.name} ended before {what}: {run.error!r}")
        if time.time() > deadline:
            raise ScenarioError(f"{run.name}: no {what} within {timeout_s:.0f} s")
        time.sleep(0.05)


def first_obs(run, world_size: int, after_s: float) -> Obs | None:
    for ob in list(run.obs):
        if ob.world_size == world_size and ob.t >= after_s:
            return ob
    return None


def max_step(run) -> int:
    return max((ob.step for ob in list(run.obs)), default=0)


def node_with_worker(cluster, nodes: list) -> Any:
    """A worker node that hosts a training worker (every 1-CPU node does once the group fills
    the cluster; prefer one whose CPU is in use)."""
    busy = set()
    try:
        from ray._private import state

        for node_id, avail in state.available_resources_per_node().items():
            if avail.get("CPU", 0.0) < 1.0:
                busy.add(node_id)
    except Exception:
        pass
    for node in nodes:
        if node.node_id in busy:
            return node
    print("  (no node with a busy CPU found; removing the first worker node)", flush=True)
    return nodes[0]


def run_system(name: str, o: argparse.Namespace) -> dict:
    """One measured run of ``name``; on a shared machine another user's ``ray stop`` can kill
    the cluster mid-run, so a failed attempt is reported and retried (``--retries``)."""
    for attempt in range(1, o.retries + 2):
        out = run_once(name, o, attempt)
        if "error" not in out or attempt > o.retries:
            return out
        print(f"  attempt {attempt} failed; retrying on a fresh cluster", flush=True)
    return out


def run_once(name: str, o: argparse.Namespace, attempt: int) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    workdir = tempfile.mkdtemp(prefix=f"recovery-{name}-", dir=o.dir)
    cfg = make_config(o, workdir)
    out: dict[str, Any] = {"system": name, "workdir": workdir, "attempt": attempt}
    print(f"\n== {name} (attempt {attempt}): cluster of 1 head (0 CPUs) + {o.nodes} x 1-CPU "
          "nodes", flush=True)
    cluster = run = None
    try:
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
        nodes = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
                 for _ in range(o.nodes)]
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=o.verbose)
        run = ElasticRun(cfg) if name == "elastic_ckpt" else RayTrainRun(cfg, o, workdir)
        t_launch = time.time()
        run.start()
        full = o.nodes
        first = wait_for(run, lambda: first_obs(run, full, 0.0), f"a step at {full} workers")
        out["start_s"] = first.t - t_launch
        wait_for(run, lambda: max_step(run) >= o.fail_at_step, f"step {o.fail_at_step}")

        # (a) node loss
        victim = node_with_worker(cluster, nodes)
        step_before = max_step(run)
        cluster.remove_node(victim, allow_graceful=o.kill == "graceful")
        t_loss = time.time()
        nodes.remove(victim)
        print(f"  node removed at step {step_before}", flush=True)
        small = full - 1
        ob = wait_for(run, lambda: first_obs(run, small, t_loss), f"a step at {small} workers")
        out["loss"] = {"t_event": t_loss, "external_s": ob.t - t_loss, "first": ob,
                       "step_before": step_before}
        print(f"  first step at {small} worker(s) {ob.t - t_loss:.2f} s after the node loss "
              f"(step {ob.step})", flush=True)

        # (b) capacity added
        wait_for(run, lambda: time.time() >= ob.t + o.settle_s, "settle")
        t_add_start = time.time()
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        t_add1 = time.time()
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        t_add = time.time()
        big = full + 1
        print(f"  2 nodes added ({t_add1 - t_add_start:.1f} s + {t_add - t_add1:.1f} s) at step "
              f"{max_step(run)}", flush=True)
        ob2 = wait_for(run, lambda: first_obs(run, big, t_add), f"a step at {big} workers")
        mid = first_obs(run, full, t_add_start)
        out["add"] = {"t_event": t_add, "t_add1": t_add1, "external_s": ob2.t - t_add,
                      "first": ob2, "first_mid": mid}
        print(f"  first step at {big} workers {ob2.t - t_add:.2f} s after the second add_node "
              f"(step {ob2.step})", flush=True)
        run.request_stop()
        run.join(WAIT_TIMEOUT_S)
        if run.thread.is_alive():
            raise ScenarioError(f"{name} did not finish within {WAIT_TIMEOUT_S:.0f} s")
        if run.error is not None:
            raise ScenarioError(f"{name} failed: {run.error!r}")
        out["final_step"] = max_step(run)
    except Exception as exc:  # ScenarioError, or the cluster died/failed to start
        out["error"] = f"{type(exc).__name__}: {exc}"
        print(f"  ERROR: {out['error']}", flush=True)
        if run is not None:
            run.request_stop()
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
    if run is not None:
        out["run"] = run
    if not o.keep:
        shutil.rmtree(workdir, ignore_errors=True)
    return out


# -- reporting -----------------------------------------------------------------------------------
PHASES = tuple(p.value for p in Phase)  # the library's timeline order


def elastic_events(out: dict) -> dict[str, list]:
    """``Result.events`` split by scenario: failure events, and scale-ups after the add."""
    run = out.get("run")
    if run is None or run.result is None:
        return {"loss": [], "add": []}
    events = list(run.result.events)
    t_add1 = out.get("add", {}).get("t_add1", float("inf"))
    return {"loss": [e for e in events if e.kind == "failure"],
            "add": [e for e in events if e.kind == "scale_up"
                    and e.started_unix_s >= t_add1 - 5.0]}


def ray_event(out: dict, key: str) -> dict | None:
    """Ray Train's view of one event: the first group started after it at the new size."""
    run, ev = out.get("run"), out.get(key)
    if run is None or ev is None:
        return None
    target = ev["first"].world_size
    starts = [s for s in run.starts if s["t_enter"] >= ev["t_event"]
              and s["world_size"] == target and s["t_enter"] <= ev["first"].t]
    if not starts:
        return None
    s = starts[-1]
    before = [ob.step for ob in run.obs if ob.t < s["t_enter"]]
    last = max(before, default=0)
    restarts = sum(1 for x in run.starts if ev["t_event"] <= x["t_enter"] <= s["t_enter"])
    return {"start": s, "last_step": last, "resumed": s["restored"],
            "lost": None if s["restored"] is None else last - s["restored"],
            "restarts": restarts}


def fmt(x: float | None, digits: int = 2) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}"


def report(results: dict[str, dict], o: argparse.Namespace) -> None:
    ec, rt = results.get("elastic_ckpt"), results.get("ray_train")
    ec_ev = elastic_events(ec) if ec else {"loss": [], "add": []}
    rows = []
    for key, label in (("loss", "(a) node loss -> first step at new size"),
                       ("add", "(b) capacity added -> first step at new size")):
        ec_s = ec.get(key, {}).get("external_s") if ec else None
        rt_s = rt.get(key, {}).get("external_s") if rt else None
        if ec:
            evs = ec_ev[key]
            lost = sum(e.steps_lost or 0 for e in evs) if evs else None
            internal = " + ".join(fmt(e.total_s) for e in evs) or "n/a"
            sizes = ", ".join(f"{e.from_workers}->{e.to_workers}" for e in evs) or "n/a"
            rows.append([label, "elastic_ckpt", fmt(ec_s), internal, sizes,
                         "n/a" if lost is None else lost,
                         fmt(ec_s / rt_s, 3) if ec_s and rt_s else "n/a"])
        if rt:
            rev = ray_event(rt, key)
            rows.append([label, "ray_train", fmt(rt_s), "n/a", _ray_sizes(rt, key),
                         "n/a" if rev is None or rev["lost"] is None else rev["lost"], ""])
    print("\n## Recovery latency (external clock: event -> first step at the new world size)\n")
    print(markdown_table(["scenario", "system", "seconds", "event total_s (internal)",
                          "workers", "steps lost", "ratio elastic_ckpt/ray_train"], rows))

    if ec and (ec_ev["loss"] or ec_ev["add"]):
        print("\n## ElasticTrainer per-phase seconds (Result.events)\n")
        events = list(ec["run"].result.events) if ec.get("run") and ec["run"].result else []
        used = [p for p in PHASES if any(p in e.phases for e in events)]
        used += sorted({p for e in events for p in e.phases} - set(used))
        erows = [[e.kind, f"{e.from_workers}->{e.to_workers}", e.at_step, e.resumed_step,
                  "n/a" if e.steps_lost is None else e.steps_lost]
                 + [fmt(e.phases.get(p)) if p in e.phases else "" for p in used]
                 + [fmt(e.total_s)] for e in events]
        print(markdown_table(["event", "workers", "at step", "resumed", "lost"] + used
                             + ["total_s"], erows))
    if rt:
        print("\n## Ray Train phases (worker-side clock, from its report file)\n")
        rrows = []
        for key, label in (("loss", "node loss"), ("add", "capacity added")):
            rev, ev = ray_event(rt, key), rt.get(key)
            if rev is None or ev is None:
                rrows.append([label] + ["n/a"] * 10)
                continue
            s = rev["start"]
            rrows.append([label, _ray_sizes(rt, key), rev["last_step"], rev["resumed"],
                          rev["lost"], rev["restarts"], fmt(s["t_enter"] - ev["t_event"]),
                          fmt(s["t_built"] - s["t_enter"]), fmt(s["t_restored"] - s["t_built"]),
                          fmt(ev["first"].t - s["t_restored"]), fmt(ev["external_s"])])
        print(markdown_table(["event", "workers", "last step", "resumed", "lost",
                              "group starts", "event->fn entered", "build", "get_checkpoint+load",
                              "first step", "total"], rrows))
    for name, res in results.items():
        extra = []
        if res.get("start_s") is not None:
            extra.append(f"first step {res['start_s']:.1f} s after launch")
        if res.get("loss"):
            extra.append(f"node removed after step {res['loss']['step_before']}")
        if res.get("add") and res["add"].get("first_mid") is not None:
            mid = res["add"]["first_mid"]
            since = mid.t - res["add"]["t_add1"]
            extra.append(f"first step at {mid.world_size} workers {since:.2f} s after the first "
                         "add_node")
        if res.get("final_step") is not None:
            extra.append(f"final step {res['final_step']}")
        result = getattr(res.get("run"), "result", None)
        if name == "elastic_ckpt" and result is not None:
            steps = [h.step for h in result.history]
            missing = sorted(set(range(1, o.steps + 1)) - set(steps))
            extra.append("Result.history complete" if not missing else
                         f"Result.history MISSING steps {missing}")
        if res.get("attempt", 1) > 1:
            extra.append(f"attempt {res['attempt']} (earlier attempts failed)")
        if res.get("error"):
            extra.append(f"ERROR {res['error']}")
        print(f"\n{name}: " + "; ".join(extra))
    print()
    for line in _goals(ec, rt, ec_ev, o):
        print(line)


def _goals(ec: dict | None, rt: dict | None, ec_ev: dict, o: argparse.Namespace) -> list[str]:
    """The live-resize goals, each with its figure from this run and met / MISSED."""
    def verdict(ok: bool) -> str:
        return "met" if ok else "MISSED"

    lines = []
    loss = (ec or {}).get("loss", {}).get("external_s")
    if loss is not None:
        lines.append(f"goal node loss -> first step <= 1.5 s: {verdict(loss <= 1.5)} "
                     f"({loss:.2f} s)")
        ray_loss = (rt or {}).get("loss", {}).get("external_s")
        if ray_loss:
            ratio = loss / ray_loss
            lines.append(f"goal node loss <= 0.02x Ray Train: {verdict(ratio <= 0.02)} "
                         f"({ratio:.3f}x)")
        lost = [e.steps_lost for e in ec_ev["loss"] if e.steps_lost is not None]
        memory = all(e.details.get("from_memory") for e in ec_ev["loss"])
        if lost and o.memory_tier:
            lines.append(f"goal node loss steps lost <= memory interval "
                         f"({o.memory_interval}): {verdict(max(lost) <= o.memory_interval)} "
                         f"({max(lost)}; restored from "
                         f"{'peer memory' if memory else 'storage'})")
        elif lost:
            lines.append(f"node loss steps lost: {max(lost)} (checkpoint interval "
                         f"{o.ckpt_interval}; --no-memory-tier: the goal of <= the memory "
                         "interval needs the peer-memory tier)")
    if ec_ev["add"]:
        resizes = len(ec_ev["add"])
        lines.append(f"goal capacity added -> one resize: {verdict(resizes == 1)} ({resizes})")
        lost = sum(e.steps_lost or 0 for e in ec_ev["add"])
        lines.append(f"goal graceful scale-up steps lost 0: {verdict(lost == 0)} ({lost})")
        add = (ec or {}).get("add", {}).get("external_s")
        if add is not None:
            after = add - o.scaling_settle_s
            lines.append(f"goal capacity added -> first step <= 1.0 s after the settle window "
                         f"(settle_s {o.scaling_settle_s:g}): {verdict(after <= 1.0)} "
                         f"({after:.2f} s after it)")
    return lines


def _ray_sizes(rt: dict, key: str) -> str:
    ev = rt.get(key)
    if not ev:
        return "n/a"
    to = ev["first"].world_size
    return f"{to + 1}->{to}" if key == "loss" else f"{to - 2}->{to}"


# -- main ----------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", choices=SYSTEMS, action="append",
                   help="run only this system (repeatable; default: both)")
    p.add_argument("--order", choices=("elastic-first", "ray-first"), default="elastic-first")
    p.add_argument("--nodes", type=int, default=2, help="1-CPU worker nodes at the start (2)")
    p.add_argument("--steps", type=int, default=300,
                   help="ElasticTrainer max_steps (300); Ray Train runs until measured")
    p.add_argument("--ckpt-interval", type=int, default=5, help="checkpoint every N steps (5)")
    p.add_argument("--no-memory-tier", dest="memory_tier", action="store_false",
                   help="elastic_ckpt without the peer-memory tier (a node loss then resumes "
                        "from the latest committed checkpoint)")
    p.add_argument("--memory-interval", type=int, default=1,
                   help="checkpoint.memory_interval_steps with the tier (1)")
    p.add_argument("--fail-at-step", type=int, default=12,
                   help="remove a node once this step is observed (12)")
    p.add_argument("--scaling-settle-s", type=float, default=ScalingConfig().settle_s,
                   help="ElasticTrainer scaling.settle_s (its default)")
    p.add_argument("--settle-s", type=float, default=8.0,
                   help="seconds after the first step at the smaller size before adding nodes")
    p.add_argument("--kill", choices=("graceful", "hard"), default="graceful",
                   help="remove_node(allow_graceful=...): graceful is Ray's default")
    p.add_argument("--cooldown-s", type=float, default=5.0,
                   help="ElasticTrainer scaling.cooldown_s (5, its default)")
    p.add_argument("--ray-resize-interval-s", type=float, default=None,
                   help="Ray Train elastic_resize_monitor_interval_s (default: Ray's, 60 s)")
    p.add_argument("--ray-max-failures", type=int, default=3,
                   help="Ray Train FailureConfig(max_failures) (3; Ray's default 0 would fail)")
    p.add_argument("--ray-report-every-step", action="store_true",
                   help="also call ray.train.report(metrics) on steps without a checkpoint "
                        "(Ray's controller drains reports every 2 s through a queue of one, "
                        "which throttles the loop)")
    add_model_flags(p, global_batch=16, micro_batch=4, num_samples=2048)
    p.add_argument("--retries", type=int, default=2,
                   help="re-run a system whose run failed (e.g. its cluster was killed) (2)")
    p.add_argument("--dir", default=None, help="parent of the per-run work dirs (default: tmp)")
    p.add_argument("--keep", action="store_true", help="keep checkpoints and logs")
    p.add_argument("--verbose", action="store_true", help="show Ray worker logs")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    o = parse_args(argv)
    systems = [s for s in SYSTEMS if s in (o.only or SYSTEMS)]
    if o.order == "ray-first":
        systems.reverse()
    import ray

    from elastic_ckpt.train import build_gpt

    cfg = make_config(o, "/tmp/unused")
    n_params = build_gpt(cfg.model).num_params()
    banner(__file__, argv, versions={"ray": ray.__version__})
    print(f"model: GPT {o.layers}x{o.d_model}, vocab {o.vocab}, seq {o.seq_len}, "
          f"{n_params:,} params; global batch {o.global_batch}, micro-batch {o.micro_batch}; "
          f"checkpoint every {o.ckpt_interval} steps; node loss at step {o.fail_at_step} "
          f"({o.kill}); nodes added {o.settle_s:.0f} s after recovery; "
          f"ElasticTrainer cooldown_s {o.cooldown_s:g}, settle_s {o.scaling_settle_s:g}; Ray Train "
          f"elastic_resize_monitor_interval_s "
          f"{'60 (default)' if o.ray_resize_interval_s is None else o.ray_resize_interval_s}, "
          f"max_failures {o.ray_max_failures}")
    t0 = time.time()
    results = {name: run_system(name, o) for name in systems}
    report(results, o)
    print(f"\nwall time {time.time() - t0:.0f} s, load average at end {loadavg()}")
    return 0 if all("error" not in r for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
