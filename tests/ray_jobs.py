"""Shared pieces of the ``ray`` tests: a loopback multi-node cluster, a tiny config, and
deterministic fault injection driven by marker files (the test process creates a file; the
rank that sees it acts once and removes it). Pickled by value so Ray workers need not import
this module."""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Iterator

import torch
import torch.distributed as dist

from elastic_ckpt import ElasticTrainer
from elastic_ckpt.config import TrainConfig
from elastic_ckpt.data import SyntheticLMDataset
from elastic_ckpt.train import build_gpt, lm_loss

SEQ, VOCAB, NUM_SAMPLES = 16, 64, 200


def tiny_config(tmp: Path, **overrides) -> TrainConfig:
    raw = {
        "max_steps": 40,
        "checkpoint": {"uri": str(tmp / "ckpt"), "interval_steps": 4, "keep_last": 3},
        "run_dir": str(tmp / "run"),
        "scaling": {"min_workers": 1, "max_workers": 3, "cooldown_s": 1.0,
                    "capacity_timeout_s": 120},
        "data": {"global_batch_size": 17, "micro_batch_size": 4,
                 "dataset": {"num_samples": NUM_SAMPLES, "seq_len": SEQ, "vocab_size": VOCAB}},
        "model": {"vocab_size": VOCAB, "d_model": 32, "n_layers": 2, "n_heads": 2,
                  "max_seq_len": SEQ},
        "log_interval_steps": 1000,
    }
    for key, value in overrides.items():
        section, _, field = key.partition("__")
        if field:
            raw.setdefault(section, {})[field] = value
        else:
            raw[key] = value
    return TrainConfig.model_validate(raw)


def dataset() -> SyntheticLMDataset:
    return SyntheticLMDataset(NUM_SAMPLES, SEQ, VOCAB, seed=0)


class Faults:
    """Marker files in ``root`` that ranks act on: ``slow`` (sleep in each micro-batch while
    present), ``crash-rank-R`` (rank R exits mid-step, once), ``crash-always-rank-R`` (rank R
    exits on every step while present), ``crash-in-save-rank-R`` (rank R exits inside the next
    checkpoint save, once), ``slow-save`` (each save takes 4 s more while present),
    ``sigstop-rank-R`` (rank R sends itself SIGSTOP mid-step, once: a
    hung process, every thread frozen)."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)

    def set(self, name: str) -> None:
        (self.root / name).touch()

    def clear(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def is_set(self, name: str) -> bool:
        return (self.root / name).exists()


def _take(path: Path) -> bool:
    try:
        path.unlink()
        return True
    except FileNotFoundError:
        return False


def faulty_loss(model, batch, root: str):
    rank = dist.get_rank()
    marks = Path(root)
    if _take(marks / f"crash-rank-{rank}") or (marks / f"crash-always-rank-{rank}").exists():
        os._exit(1)  # a worker dying mid-step, without cleanup
    if _take(marks / f"sigstop-rank-{rank}"):
        os.kill(os.getpid(), signal.SIGSTOP)  # frozen until someone SIGCONTs or kills it
    if (marks / "slow").exists():
        time.sleep(0.15)
    return lm_loss(model, batch)


def faulty_model(config: TrainConfig, root: str):
    model = build_gpt(config.model)

    def crash_in_save(module, prefix, keep_vars):
        if _take(Path(root) / f"crash-in-save-rank-{dist.get_rank()}"):
            os._exit(1)  # dies inside CheckpointManager.save (state_dict of the save)
        if (Path(root) / "slow-save").exists():
            time.sleep(4.0)  # every state_dict of a save (or snapshot) takes 4 s more

    model.register_state_dict_pre_hook(crash_in_save)
    return model


def trainer_kwargs(config: TrainConfig, faults: Faults) -> dict:
    return {"model_fn": functools.partial(faulty_model, config, str(faults.root)),
            "loss_fn": functools.partial(faulty_loss, root=str(faults.root)),
            "dataset": dataset(), "config": config, "record_samples": True}


@contextlib.contextmanager
def loopback_cluster(num_nodes: int, cpus_per_node: int = 1) -> Iterator:
    """A ``ray.cluster_utils.Cluster`` on 127.0.0.1: head with 0 CPUs (it hosts the
    coordinator) and ``num_nodes`` worker nodes; the driver connects to it. Always shut
    down, so no Ray process outlives the test."""
    import ray  # noqa: PLC0415
    from ray.cluster_utils import Cluster  # noqa: PLC0415

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # Ray's own cloudpickle
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 0, "include_dashboard": False, "node_ip_address": "127.0.0.1"})
    try:
        for _ in range(num_nodes):
            cluster.add_node(num_cpus=cpus_per_node, node_ip_address="127.0.0.1")
        ray.init(address=cluster.address)
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


def drain_node(address: str, node_id: str, deadline_s: float,
               message: str = "spot preemption (test)") -> None:
    """``ray drain-node`` as a spot preemption notice, with ``deadline_s`` left."""
    subprocess.run(["ray", "drain-node", "--address", address, "--node-id", node_id,
                    "--reason", "DRAIN_NODE_REASON_PREEMPTION", "--reason-message", message,
                    "--deadline-remaining-seconds", str(int(deadline_s))],
                   check=True, timeout=60, capture_output=True)


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout_s}s waiting for {what}")
        time.sleep(0.05)


def full_params(model) -> dict[str, torch.Tensor]:
    return {k: v.full_tensor() if hasattr(v, "full_tensor") else v
            for k, v in model.state_dict().items()}


def buggy_loss(model, batch):
    """A user's bug: the dataset has no ``labels`` (the same KeyError on every attempt)."""
    return lm_loss(model, {"input_ids": batch["input_ids"], "labels": batch["labels"]})


class Run:
    """``fit()`` on a background thread (the cluster is driven from the main thread)."""

    def __init__(self, **kwargs) -> None:
        self.steps = []
        self.result = self.error = None
        self.trainer = ElasticTrainer(
            on_progress=lambda progress: self.steps.extend(progress.steps), **kwargs)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.trainer.fit()
        except BaseException as exc:  # re-raised in the test thread by join()
            self.error = exc

    def reached(self, step: int, world_size: int | None = None) -> bool:
        if not self.thread.is_alive():
            self.join(0)  # fit() ended early: surface its error now
        return any(m.step >= step and (world_size is None or m.world_size == world_size)
                   for m in self.steps)

    def join(self, timeout_s: float = 400):
        self.thread.join(timeout_s)
        assert not self.thread.is_alive(), "fit() did not return"
        if self.error is not None:
            raise self.error
        return self.result
