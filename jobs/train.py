"""Elastic FSDP2 training on Ray of the model the config names (built-in GPT or an HF model).

    python jobs/train.py                                   # embedded local Ray, CPU, defaults
    python jobs/train.py --config configs/cpu_default.yaml --set max_steps=100
    ray job submit --working-dir . -- python jobs/train.py --config configs/<name>.yaml

Which Ray: ``--ray-address`` (default: Ray's convention: RAY_ADDRESS, which ``ray job submit``
sets, else a cluster ``ray start`` runs on this machine, else a new local Ray); the first line
says which. Relative paths resolve against the working directory; under ``ray job submit``
(whose working dir is a temporary copy) checkpoint.uri and run_dir must be absolute or s3://.
Re-running with the same ``checkpoint.uri`` resumes from its latest checkpoint.

SIGTERM (``ray job stop``, a scheduler's stop) or Ctrl-C stops the run within half a second
(``ElasticTrainer.stop``): the coordinator and its workers are killed, the checkpoint root's
lease is released, no further checkpoint is committed, and the exit status is 128 + the signal
(143, 130); a second signal ends the process at once. The steps since the latest committed
checkpoint are lost; re-running resumes from it.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from elastic_ckpt.config import load_config  # noqa: E402
from elastic_ckpt.errors import ElasticCkptError, TrainingStoppedError  # noqa: E402
from elastic_ckpt.trainer import ElasticTrainer  # noqa: E402
from elastic_ckpt.trainer.ray_session import ADDRESS_HELP  # noqa: E402
from elastic_ckpt.trainer.progress import ProgressPrinter, format_event  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="Elastic FSDP2 training on Ray of the model the "
                                "config names (the built-in GPT by default, or model.kind: hf).")
    p.add_argument("--config", help="YAML file (see configs/); default: built-in defaults")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                   help="override a field, e.g. --set data.global_batch_size=64 (repeatable)")
    p.add_argument("--ray-address", default=None, metavar="local|auto|ADDR", help=ADDRESS_HELP)
    return p.parse_args(argv)


def describe_model(config) -> str:
    m = config.model
    if m.kind == "gpt":
        return f"GPT {m.n_layers} layers x {m.d_model}"
    if m.path is not None:
        return f"HF model from {m.path}"
    c = m.config
    layers = c.get("num_hidden_layers", c.get("n_layer", "?"))
    return f"HF {c['model_type']} {layers} layers x {c.get('hidden_size', c.get('n_embd', '?'))}"


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        config = load_config(args.config, args.set)
        printer = ProgressPrinter(config)
        trainer = ElasticTrainer(config=config, on_progress=printer,
                                 ray_address=args.ray_address)
    except ElasticCkptError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    s = config.scaling
    print(f"elastic_ckpt: {describe_model(config)}, {config.max_steps} steps, "
          f"global batch {config.data.global_batch_size}, {s.min_workers}-{s.max_workers} "
          "workers", flush=True)
    started = time.perf_counter()
    received: list[int] = []

    def stop(signum: int, frame) -> None:  # only a flag: Ray's calls must not be interrupted
        received.append(signum)
        trainer.stop(f"{signal.Signals(signum).name} received")
        for again in (signal.SIGTERM, signal.SIGINT):  # a second signal ends the process
            signal.signal(again, signal.SIG_DFL)

    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, stop)
    try:
        result = trainer.fit()
    except TrainingStoppedError as exc:
        printer.close()
        print(f"stopped: {exc}", file=sys.stderr, flush=True)
        return 128 + received[0]
    except ElasticCkptError as exc:
        printer.close()
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        printer.close()
    losses = [h.loss for h in result.history]
    trained = f"loss {losses[0]:.4f} -> {losses[-1]:.4f}" if losses else (
        "nothing to do: the checkpoint is already at max_steps (raise max_steps or use a new "
        "checkpoint.uri)")
    print(f"done: step {result.final_step}, {trained}, {time.perf_counter() - started:.1f}s")
    if result.eval_history:
        evals = result.eval_history
        print(f"eval loss: {evals[0].loss:.4f} (step {evals[0].step}) -> {evals[-1].loss:.4f} "
              f"(step {evals[-1].step})")
    print(f"last checkpoint: {result.checkpoint.uri if result.checkpoint else None}")
    print("scaling timeline:")
    for event in result.events:
        print(f"  {format_event(event)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
