"""``ray`` tests: ElasticTrainer on a loopback ``ray.cluster_utils.Cluster`` (head with 0 CPUs,
1-CPU worker nodes): node loss, capacity added, drain, worker crashes, max_failures."""

from __future__ import annotations

import functools
import os

import pytest
import torch
from ray_jobs import (
    Faults,
    Run,
    dataset,
    drain_node,
    loopback_cluster,
    tiny_config,
    trainer_kwargs,
    wait_for,
)

from elastic_ckpt import CheckpointManager, TrainingFailedError, verify
from elastic_ckpt.checkpoint.catalog import open_checkpoint
from elastic_ckpt.checkpoint.export import assemble_tensor
from elastic_ckpt.checkpoint.reader import ChunkReader
from elastic_ckpt.data import ElasticSampler
from elastic_ckpt.train import build_gpt, lm_loss
from elastic_ckpt.train import TrainJob, TrainSpec
from elastic_ckpt.storage import Storage
from elastic_ckpt.train.local import run_local_group

pytestmark = [pytest.mark.ray, pytest.mark.timeout(600)]


def _reference_root(tmp_path, world_size: int) -> str:
    """Where ``reference_losses`` at ``world_size`` keeps its checkpoints."""
    return os.path.join(tmp_path, "ref-ckpt" if world_size == 2 else f"ref-ckpt-w{world_size}")


def reference_losses(config, tmp_path, world_size: int = 2) -> dict[int, float]:
    """The same run at a fixed world size (2 unless told), without Ray (its final checkpoint
    in ``tmp_path/ref-ckpt``, or ``ref-ckpt-w{W}`` at another size)."""
    ref_config = config.model_copy(update={"checkpoint": config.checkpoint.model_copy(
        update={"uri": _reference_root(tmp_path, world_size)})})
    history = []
    job = TrainJob(ref_config, TrainSpec(functools.partial(build_gpt, ref_config.model), lm_loss),
                   dataset())
    run_local_group(job, world_size, on_step=history.append)
    return {m.step: m.loss for m in history}


def final_parameters(checkpoint_uri: str) -> dict[str, torch.Tensor]:
    """The model's full tensors in a committed checkpoint."""
    directory, manifest = open_checkpoint(Storage(checkpoint_uri))
    reader = ChunkReader(directory, manifest)
    return {fqn: assemble_tensor(reader, fqn) for fqn in manifest.tensors
            if fqn.startswith("app.model.")}


def comparable(fqn: str, value: torch.Tensor) -> torch.Tensor:
    """The part of a final parameter that is compared across runs: all of it, except the
    attention key bias. Softmax is shift-invariant per query, so the key bias gets no
    gradient: Adam turns its rounding noise (set by the reduction order at each world size)
    into steps far larger than the noise, a random walk (2e-5 after 24 steps, 1e-3 after 240),
    which ``check_exact_training`` only bounds by Adam's step (lr per step)."""
    if fqn.endswith(".qkv.bias"):
        q, _, v = value.chunk(3)
        return torch.cat([q, v])
    return value


def reference_parameters(config, world_size: int = 2) -> dict[str, torch.Tensor]:
    """The final parameters of ``reference_losses(config, ..., world_size)`` (run with the
    directory that holds ``config.checkpoint.uri``)."""
    ref_root = _reference_root(os.path.dirname(config.checkpoint.uri), world_size)
    return final_parameters(CheckpointManager(ref_root).latest().uri)


def check_exact_training(result, config, ref: dict[int, float],
                         atol: dict[str, float] | None = None) -> dict[str, float]:
    """The elastic run equals the fixed-size reference: the exact sample ledger, per-step
    losses within rtol 1e-5, final parameters within ``atol`` (1e-6 for each tensor unless
    told). Returns each parameter's largest absolute difference."""
    steps = [h.step for h in result.history]
    assert steps == list(range(1, config.max_steps + 1))
    sampler = ElasticSampler(len(dataset()), config.data.global_batch_size, config.data.seed)
    for step in steps:
        consumed = sorted(result.sample_ledger[step])
        assert consumed == sorted(sampler.global_batch(step - 1).tolist()), f"step {step}"
    losses = torch.tensor([h.loss for h in result.history], dtype=torch.float64)
    expected = torch.tensor([ref[s] for s in steps], dtype=torch.float64)
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=0)
    verify(result.checkpoint.uri)
    # The final parameters equal those of the fixed-size run (reference_losses' checkpoint).
    final = final_parameters(result.checkpoint.uri)
    reference = reference_parameters(config)
    assert sorted(final) == sorted(reference) and final
    diffs = {}
    for fqn, value in final.items():
        if fqn.endswith(".qkv.bias"):
            bound = config.optim.lr * config.max_steps
            key, ref_key = value.chunk(3)[1], reference[fqn].chunk(3)[1]
            assert key.abs().max() <= bound and ref_key.abs().max() <= bound, fqn
        value, expected = comparable(fqn, value), comparable(fqn, reference[fqn])
        diffs[fqn] = (value - expected).abs().max().item()
        tol = 1e-6 if atol is None else atol[fqn]
        torch.testing.assert_close(value, expected, rtol=0, atol=tol,
                                   msg=lambda m, fqn=fqn, tol=tol: f"{fqn} (atol {tol:.1e}): {m}")
    return diffs


def test_node_loss_then_capacity_added(tmp_path):
    config = tiny_config(tmp_path, max_steps=48)
    ref = reference_losses(config, tmp_path)
    faults = Faults(tmp_path / "faults")
    with loopback_cluster(num_nodes=2) as cluster:
        worker_nodes = list(cluster.worker_nodes)
        run = Run(**trainer_kwargs(config, faults))
        wait_for(lambda: run.reached(6, world_size=2), 180, "step 6 at 2 workers")
        faults.set("slow")  # keep steps slow until each transition has been observed
        cluster.remove_node(worker_nodes[0])
        wait_for(lambda: run.reached(12, world_size=1), 180, "training at 1 worker")
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        cluster.add_node(num_cpus=1, node_ip_address="127.0.0.1")
        wait_for(lambda: any(m.world_size == 3 for m in run.steps), 240, "training at 3")
        faults.clear("slow")
        result = run.join()
    sizes = [h.world_size for h in result.history]
    assert sizes[0] == 2 and 1 in sizes and sizes[-1] == 3
    kinds = [e.kind for e in result.events]
    assert kinds[0] == "start" and "failure" in kinds and "scale_up" in kinds
    assert all(e.steps_lost == 0 for e in result.events if e.kind == "scale_up")
    failure = next(e for e in result.events if e.kind == "failure")
    assert failure.resumed_step % config.checkpoint.interval_steps == 0
    # The survivor's process trained on: only the new nodes' workers were started.
    assert kept(failure) == (1, 0), failure.details
    assert [kept(e) for e in result.events if e.kind == "scale_up"][-1][0] >= 1
    assert sum(kept(e)[1] for e in result.events if e.kind == "scale_up") == 2
    # ... and started as hot spares while the group trained, not on the resize's path.
    assert all(e.details["spares"] == e.details["workers_started"]
               for e in result.events if e.kind == "scale_up")
    # Every writer of the stop checkpoint stayed: the new group re-sharded from memory.
    assert all(e.details["from_peers_bytes"] > 0 and e.details["from_storage_bytes"] == 0
               for e in result.events if e.kind == "scale_up"), result.events
    # A failure loads from storage: the survivors hold nothing of the interval checkpoint.
    assert failure.details["from_peers_bytes"] == 0 < failure.details["from_storage_bytes"]
    check_exact_training(result, config, ref)


@pytest.mark.slow  # ~30 s; the chaos soak (default suite) loses nodes with the tier on, and
# test_memory_tier checks the memory restore bit for bit
def test_node_loss_recovers_from_peer_memory(tmp_path):
    """With the peer-memory tier and no interval checkpoint, a node loss costs at most the
    memory interval: the survivor restores the last snapshot, its own shard and the replica
    of the lost rank's, from its memory."""
    config = tiny_config(tmp_path, max_steps=24, scaling__max_workers=2,
                         checkpoint__interval_steps=None, checkpoint__memory_tier=True)
    ref = reference_losses(config, tmp_path)
    faults = Faults(tmp_path / "faults")
    with loopback_cluster(num_nodes=2) as cluster:
        run = Run(**trainer_kwargs(config, faults))
        wait_for(lambda: run.reached(6, world_size=2), 180, "step 6 at 2 workers")
        faults.set("slow")
        cluster.remove_node(list(cluster.worker_nodes)[0])
        wait_for(lambda: any(m.world_size == 1 for m in run.steps), 180, "training at 1")
        faults.clear("slow")
        result = run.join()
    failure = next(e for e in result.events if e.kind == "failure")
    assert failure.details["from_memory"], failure.details
    assert failure.resumed_step >= 6 and failure.steps_lost <= 1, failure.to_json()
    assert failure.details["from_storage_bytes"] == 0 < failure.details["from_peers_bytes"]
    assert kept(failure) == (1, 0)
    check_exact_training(result, config, ref)


def kept(event) -> tuple[int, int]:
    """(processes kept from the previous group, processes started) of a resize; the kept
    count is checked against the ranks' own report that they trained in an earlier group."""
    details = event.details
    assert details.get("processes_reused", 0) == details["workers_kept"], details
    return details["workers_kept"], details["workers_started"]


@pytest.mark.slow  # ~30 s; the chaos soak (default suite) drains a node
def test_drain_checkpoints_before_deadline(tmp_path):
    config = tiny_config(tmp_path, max_steps=30, scaling__max_workers=2)
    ref = reference_losses(config, tmp_path)
    faults = Faults(tmp_path / "faults")
    with loopback_cluster(num_nodes=2) as cluster:
        run = Run(**trainer_kwargs(config, faults))
        wait_for(lambda: run.reached(5, world_size=2), 180, "step 5 at 2 workers")
        faults.set("slow")
        node = cluster.worker_nodes.__iter__().__next__()
        drain_node(cluster.address, node.node_id, deadline_s=60)
        wait_for(lambda: any(m.world_size == 1 for m in run.steps), 120, "training at 1")
        faults.clear("slow")
        result = run.join()
    drain = [e for e in result.events if e.kind == "drain"]
    assert len(drain) == 1 and drain[0].steps_lost == 0 and "save" in drain[0].phases
    assert drain[0].to_workers == 1 and kept(drain[0]) == (1, 0)
    # The kept rank's chunks came from its memory, the drained rank's from storage.
    assert drain[0].details["from_peers_bytes"] > 0 < drain[0].details["from_storage_bytes"]
    assert drain[0].phases["drain"] < 60  # checkpointed well before the deadline
    check_exact_training(result, config, ref)


@pytest.mark.slow  # ~40 s; the chaos soak SIGKILLs workers mid-step, and crashes inside a
# save are covered at the checkpoint layer (test_checkpoint_faults, test_async_save)
def test_worker_crash_mid_step_and_during_save(tmp_path):
    config = tiny_config(tmp_path, max_steps=32, scaling__max_workers=2,
                         failure__max_failures=2)
    ref = reference_losses(config, tmp_path)
    faults = Faults(tmp_path / "faults")
    with loopback_cluster(num_nodes=2):
        run = Run(**trainer_kwargs(config, faults))
        wait_for(lambda: run.reached(6, world_size=2), 180, "step 6")
        faults.set("crash-rank-1")  # rank 1 exits in its next micro-batch
        wait_for(lambda: not faults.is_set("crash-rank-1"), 60, "the crash")
        wait_for(lambda: run.reached(14), 240, "recovery")
        faults.set("crash-in-save-rank-0")  # rank 0 exits inside the next save
        result = run.join()
    failures = [e for e in result.events if e.kind == "failure"]
    assert len(failures) == 2
    first, second = failures
    assert first.resumed_step <= first.at_step and first.resumed_step % 4 == 0
    # The save that crashed never committed: recovery used the checkpoint before it.
    assert second.resumed_step % 4 == 0 and second.resumed_step < second.at_step + 1
    assert kept(first) == (1, 1) and kept(second) == (1, 1)  # the crashed one is replaced
    check_exact_training(result, config, ref)


def test_max_failures_exceeded_raises_and_keeps_checkpoint(tmp_path):
    config = tiny_config(tmp_path, max_steps=200, scaling__max_workers=2,
                         failure__max_failures=1)
    faults = Faults(tmp_path / "faults")
    with loopback_cluster(num_nodes=2):
        run = Run(**trainer_kwargs(config, faults))
        wait_for(lambda: run.reached(9, world_size=2), 180, "step 9")
        faults.set("crash-always-rank-1")
        with pytest.raises(TrainingFailedError, match=r"max_failures=1.*step-0000"):
            run.join()
    from elastic_ckpt import CheckpointManager

    latest = CheckpointManager(config.checkpoint.uri).latest()
    assert latest is not None and latest.step >= 8
    verify(latest.uri)


def test_too_few_workers_waits_then_fails_clearly(tmp_path):
    config = tiny_config(tmp_path, max_steps=10, scaling__min_workers=2,
                         scaling__max_workers=2, scaling__capacity_timeout_s=3)
    faults = Faults(tmp_path / "faults")
    with loopback_cluster(num_nodes=1):
        run = Run(**trainer_kwargs(config, faults))
        with pytest.raises(TrainingFailedError,
                           match=r"only 1 worker.*min_workers=2.*capacity_timeout_s"):
            run.join(120)
    assert run.steps == []
