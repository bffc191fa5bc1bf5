"""Train the built-in GPT on the synthetic dataset, re-sharding across a world-size change.

    python jobs/train.py                       # default config, CPU, local ranks
    python jobs/train.py --config configs/cpu_default.yaml --set max_steps=100

Until the Ray runtime lands this runs the ranks with torch.multiprocessing: the first half of
the steps at ``--workers`` ranks (default 2), then the group stops with a checkpoint and
resumes at ``--resize-to`` ranks (default 3) from it, re-sharding model and optimizer state.
Re-running with the same ``checkpoint.uri`` resumes from its latest checkpoint.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from elastic_ckpt.config import TrainConfig, load_config  # noqa: E402
from elastic_ckpt.data import SyntheticLMDataset  # noqa: E402
from elastic_ckpt.errors import ElasticCkptError  # noqa: E402
from elastic_ckpt.train import build_gpt, lm_loss  # noqa: E402
from elastic_ckpt.train.local import LocalJob, run_local_group  # noqa: E402
from elastic_ckpt.train.loop import StepMetrics  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", help="YAML file (see configs/); default: built-in defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set data.global_batch_size=64 (repeatable)")
    p.add_argument("--workers", type=int, default=None,
                   help="world size of the first phase (default 2)")
    p.add_argument("--resize-to", type=int, default=3,
                   help="world size after the mid-run resize (default 3; 0 = no resize)")
    return p.parse_args(argv)


def build_dataset(config: TrainConfig):
    ds = config.data.dataset
    if ds.kind == "synthetic":
        return SyntheticLMDataset(ds.num_samples, ds.seq_len, ds.vocab_size, seed=config.seed)
    from elastic_ckpt.data import ParquetDataset  # noqa: PLC0415

    return ParquetDataset(ds.uri, column=ds.column, seq_len=ds.seq_len)


class Progress:
    """Prints step, loss, world size and throughput every ``log_interval_steps``."""

    def __init__(self, config: TrainConfig) -> None:
        self.every = config.log_interval_steps
        self.max_steps = config.max_steps
        self.history: list[StepMetrics] = []
        self.events: list[tuple[str, dict]] = []

    def on_step(self, m: StepMetrics) -> None:
        self.history.append(m)
        if m.step % self.every == 0 or m.step == self.max_steps:
            recent = self.history[-self.every:]
            secs = sum(r.step_time_s for r in recent)
            print(f"step {m.step:5d}/{self.max_steps}  loss {m.loss:.4f}  world {m.world_size}  "
                  f"lr {m.lr:.2e}  {sum(r.samples for r in recent) / secs:8.1f} samples/s  "
                  f"{sum(r.tokens for r in recent) / secs:9.0f} tok/s", flush=True)

    def on_event(self, name: str, fields: dict) -> None:
        self.events.append((name, fields))
        if name == "restore" and fields.get("from_world_size"):
            print(f"-- restored step {fields['step']} (saved at world size "
                  f"{fields['from_world_size']}) in {fields['seconds']:.2f}s", flush=True)
        elif name == "checkpoint":
            print(f"-- checkpoint step {fields['step']}: {fields['bytes'] / 1e6:.1f} MB in "
                  f"{fields['seconds']:.2f}s", flush=True)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.set)
    except ElasticCkptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    first = args.workers or 2
    phases = [(first, config.max_steps // 2), (args.resize_to, None)] if args.resize_to else [
        (first, None)]
    job = LocalJob(config=config, model_fn=functools.partial(build_gpt, config.model),
                   dataset=build_dataset(config), loss_fn=lm_loss)
    progress = Progress(config)
    print(f"elastic_ckpt: GPT {config.model.n_layers}x{config.model.d_model}, "
          f"{config.max_steps} steps, global batch {config.data.global_batch_size}, "
          f"checkpoints in {config.checkpoint.uri}", flush=True)
    started = time.perf_counter()
    result = None
    for world_size, stop_after in phases:
        print(f"== running at world size {world_size}", flush=True)
        phase = LocalJob(**{**job.__dict__, "stop_after_steps": stop_after})
        result = run_local_group(phase, world_size, progress.on_step, progress.on_event)
        if result.final_step >= config.max_steps:
            break
    assert result is not None
    losses = [m.loss for m in progress.history]
    trained = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else (
        "nothing to do: the checkpoint is already at max_steps (raise max_steps or use a new "
        "checkpoint.uri)")
    print(f"done: step {result.final_step}, {trained}, {time.perf_counter() - started:.1f}s, "
          f"last checkpoint {result.checkpoint.uri if result.checkpoint else None}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
