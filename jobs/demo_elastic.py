"""Elastic training on one machine: lose a node, gain two, and watch training carry on.

    python jobs/demo_elastic.py                 # ~2-3 minutes on a laptop
    python jobs/demo_elastic.py --steps 300 --keep

What it does:

1. starts a local multi-node Ray cluster (``ray.cluster_utils.Cluster``): a head node with no
   CPUs (it hosts the coordinator) and two worker nodes with one CPU each, all on 127.0.0.1;
2. trains the built-in GPT on synthetic data with ``ElasticTrainer`` (1 to 3 workers, FSDP2 on
   gloo), so it starts at 2 workers;
3. removes a node mid-run (a crash: training restarts at 1 worker from the last checkpoint);
4. adds two nodes (capacity: training stops at a step boundary with a checkpoint and restarts at
   3 workers, losing nothing);
5. prints the scaling timeline (each event's per-phase seconds) and shuts everything down
   (with ``--keep`` or ``--dir``, ``elastic-ckpt timeline RUN_DIR`` then draws it).

The global batch, sample order and loss curve are the same as a run that never resized.
"""

from __future__ import annotations

import os

# Before ray is imported: every Ray node binds and advertises 127.0.0.1 only.
os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import argparse  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from elastic_ckpt import ElasticTrainer, TrainConfig  # noqa: E402

STEP_TIMEOUT_S = 300.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=240, help="training steps (240)")
    p.add_argument("--remove-at", type=int, default=25,
                   help="remove a node once this step is reached (25)")
    p.add_argument("--add-after", type=int, default=25,
                   help="add two nodes after this many steps at 1 worker (25)")
    p.add_argument("--dir", help="where checkpoints and events.jsonl go (default: a temp dir)")
    p.add_argument("--keep", action="store_true", help="keep the checkpoints and the timeline")
    return p.parse_args(argv)


def demo_config(steps: int, workdir: str) -> TrainConfig:
    return TrainConfig(
        max_steps=steps,
        log_interval_steps=10,
        scaling={"min_workers": 1, "max_workers": 3, "cooldown_s": 2.0},
        checkpoint={"uri": os.path.join(workdir, "checkpoints"), "interval_steps": 10,
                    "keep_last": 2},
        run_dir=os.path.join(workdir, "run"),
        data={"global_batch_size": 24, "micro_batch_size": 4,
              "dataset": {"num_samples": 4096, "seq_len": 64, "vocab_size": 256}},
        model={"vocab_size": 256, "d_model": 128, "n_layers": 4, "n_heads": 4,
               "max_seq_len": 64},
    )


class Training:
    """``fit()`` on a background thread, so this script can drive the cluster meanwhile."""

    def __init__(self, config: TrainConfig) -> None:
        self.config = config
        self.steps: list = []
        self.result = None
        self.error: BaseException | None = None
        self._last_print = time.time()
        self.thread = threading.Thread(target=self._fit, daemon=True)

    def _fit(self) -> None:
        try:
            self.result = ElasticTrainer(config=self.config, on_progress=self._show).fit()
        except BaseException as exc:  # reported by the main thread
            self.error = exc

    def _show(self, progress) -> None:
        for m in progress.steps:
            new_size = not self.steps or self.steps[-1].world_size != m.world_size
            self.steps.append(m)
            if new_size or m.step % self.config.log_interval_steps == 0:
                print(f"step {m.step:4d}/{self.config.max_steps}  loss {m.loss:.4f}  "
                      f"workers {m.world_size}  {m.step_time_s * 1e3:6.0f} ms/step", flush=True)
        for e in progress.events:
            lost = "" if e.steps_lost is None else f", {e.steps_lost} step(s) lost"
            resumed = "" if not e.resumed_step else f", resumed from step {e.resumed_step}"
            print(f"-- {e.kind}: {e.from_workers} -> {e.to_workers} workers in "
                  f"{e.total_s:.1f} s{resumed}{lost}", flush=True)

    def wait_until(self, done, what: str) -> bool:
        """Wait for ``done()``; False if training ended (or stalled) first."""
        deadline = time.time() + STEP_TIMEOUT_S
        while not done():
            if not self.thread.is_alive() or time.time() > deadline:
                print(f"(training ended before {what})", flush=True)
                return False
            time.sleep(0.1)
        return True

    def steps_at(self, world_size: int) -> int:
        return sum(1 for m in self.steps if m.world_size == world_size)


def print_timeline(result) -> None:
    print("\nScaling timeline (seconds per phase; see ARCHITECTURE.md for what each one covers):")
    for e in result.events:
        lost = "-" if e.steps_lost is None else str(e.steps_lost)
        phases = "  ".join(f"{name} {secs:.2f}" for name, secs in e.phases.items())
        print(f"  {e.kind:10s} {e.from_workers} -> {e.to_workers}  steps lost {lost:>2}  "
              f"total {e.total_s:5.2f} s   {phases}")
    sizes = []
    for h in result.history:
        if not sizes or sizes[-1][0] != h.world_size:
            sizes.append((h.world_size, h.step))
    print("World size by step: " + ", ".join(f"{w} from step {s}" for w, s in sizes))
    print(f"Final step {result.final_step}; loss {result.history[0].loss:.4f} -> "
          f"{result.history[-1].loss:.4f}; last checkpoint "
          f"{result.checkpoint.uri if result.checkpoint else None}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    import ray
    from ray.cluster_utils import Cluster

    workdir = args.dir or tempfile.mkdtemp(prefix="elastic-demo-")
    config = demo_config(args.steps, workdir)
    cluster = None
    try:
        print("Starting a local Ray cluster: a head node (0 CPUs) + 2 worker nodes (1 CPU each)",
              flush=True)
        cluster = Cluster(initialize_head=True, head_node_args={
            "num_cpus": 0, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
        nodes = [cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1") for _ in range(2)]
        ray.init(address=cluster.address, logging_level="WARNING", log_to_driver=False)
        print(f"Training a {config.model.n_layers}-layer GPT for {config.max_steps} steps with "
              f"1-3 workers; checkpoints every {config.checkpoint.interval_steps} steps in "
              f"{config.checkpoint.uri}", flush=True)
        training = Training(config)
        training.thread.start()

        if training.wait_until(lambda: training.steps_at(2) and
                               training.steps[-1].step >= args.remove_at, f"step {args.remove_at}"):
            print("\n== Removing a worker node (as if it crashed)\n", flush=True)
            cluster.remove_node(nodes[0])
            if training.wait_until(lambda: training.steps_at(1) >= args.add_after,
                                   f"{args.add_after} steps at 1 worker"):
                print("\n== Adding two worker nodes\n", flush=True)
                for _ in range(2):
                    cluster.add_node(wait=False, num_cpus=1, node_ip_address="127.0.0.1")
                cluster.wait_for_nodes()

        training.thread.join()
        if training.error is not None:
            print(f"\ntraining failed: {training.error}", file=sys.stderr)
            return 1
        print_timeline(training.result)
        if args.keep or args.dir:
            print(f"Kept {workdir} (events.jsonl and metrics.jsonl in {config.run_dir}); "
                  f"draw the run: elastic-ckpt timeline {config.run_dir}")
        return 0
    finally:
        ray.shutdown()
        if cluster is not None:
            cluster.shutdown()
        if not args.keep and not args.dir:
            shutil.rmtree(workdir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
