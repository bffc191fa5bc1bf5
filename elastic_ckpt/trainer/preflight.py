"""Checks a run makes on the driver before any worker starts, so that a wrong path or a
dataset that cannot be read fails in seconds, naming the field and the cause, instead of at
the first save (or after every retry)."""

from __future__ import annotations

import dataclasses
import uuid
from typing import Any

from elastic_ckpt.checkpoint import CheckpointInfo, CheckpointManager
from elastic_ckpt.checkpoint.weights import open_weights
from elastic_ckpt.config import TrainConfig
from elastic_ckpt.errors import CheckpointError, ConfigError, ElasticCkptError, StorageError
from elastic_ckpt.storage import Storage

PROBE_PREFIX = ".elastic_ckpt-probe-"


@dataclasses.dataclass(frozen=True)
class Preflight:
    """What the checks found: where the run writes and what it resumes from."""

    checkpoint_uri: str
    run_dir: str
    latest: CheckpointInfo | None
    """The committed checkpoint the run resumes from (None: a fresh start)."""

    def describe(self) -> str:
        if self.latest is not None:
            start = f"resuming from step {self.latest.step} ({self.latest.uri})"
        else:
            start = "no checkpoint yet: fresh start"
        return f"checkpoints in {self.checkpoint_uri} ({start}); run files in {self.run_dir}"


def preflight(config: TrainConfig, dataset: Any, eval_dataset: Any = None) -> Preflight:
    """Probe the checkpoint root and ``run_dir`` (create, write and delete a file), open the
    datasets, and check ``checkpoint.init_from`` when the run starts from it. Raises a typed
    error (``StorageError``, ``ConfigError``, ``CheckpointError``) naming the field."""
    ck = config.checkpoint
    probe_writable("checkpoint.uri", ck.uri)
    probe_run_dir(config.run_dir)
    check_dataset("data.dataset", "the training dataset", dataset)
    if eval_dataset is not None:
        check_dataset("eval.dataset", "the eval dataset", eval_dataset)
    try:
        latest = CheckpointManager(ck.uri).latest()
    except ElasticCkptError as exc:
        raise StorageError(f"checkpoint.uri {ck.uri}: cannot list its checkpoints: {exc}",
                           path=ck.uri, field="checkpoint.uri") from None
    if latest is None and ck.init_from is not None:
        check_init_from(ck.init_from)
    return Preflight(ck.uri, config.run_dir, latest)


def probe_writable(field: str, uri: str) -> None:
    """Create ``uri`` as a directory, write a small file in it and delete it again."""
    name = f"{PROBE_PREFIX}{uuid.uuid4().hex[:12]}"
    try:
        storage = Storage(uri)
        storage.makedirs()
        storage.write_atomic(name, b"elastic_ckpt write probe\n")
        storage.remove(name)
    except (StorageError, OSError) as exc:
        raise StorageError(
            f"{field} {uri} is not writable: {exc}. Nothing was trained. Point {field} at a "
            "directory this job can create and write (check the path, its permissions and "
            "free space; for an object store, the bucket and credentials).",
            path=uri, field=field) from None


def probe_run_dir(run_dir: str) -> None:
    if "://" in run_dir and not run_dir.startswith("file://"):
        raise ConfigError(f"run_dir {run_dir} must be a local directory (it holds "
                          "events.jsonl, metrics.jsonl and TensorBoard files the driver "
                          "writes); set it to an absolute local path", field="run_dir")
    probe_writable("run_dir", run_dir.removeprefix("file://"))  # creates it as a directory


def check_dataset(field: str, what: str, dataset: Any) -> None:
    """``len(dataset)`` and ``dataset[0]`` work: the dataset opens and yields a sample."""
    name = type(dataset).__name__
    where = getattr(dataset, "uri", None)
    label = f"{what} ({name}{f' at {where}' if where else ''})"
    try:
        size = len(dataset)
    except Exception as exc:  # noqa: BLE001 - the user's dataset: report whatever it raised
        raise ConfigError(f"{label}: len() failed: {type(exc).__name__}: {exc}",
                          field=field) from None
    if size == 0:
        raise ConfigError(f"{label} is empty", field=field)
    try:
        dataset[0]
    except ElasticCkptError as exc:
        raise ConfigError(f"{label}: reading sample 0 failed: {exc}", field=field) from None
    except Exception as exc:  # noqa: BLE001
        raise ConfigError(f"{label}: reading sample 0 failed: {type(exc).__name__}: {exc}",
                          field=field) from None


def check_init_from(uri: str) -> None:
    """The pretrained weights exist and their headers read (no tensor data is read)."""
    try:
        open_weights(uri)
    except (CheckpointError, StorageError) as exc:
        raise type(exc)(f"checkpoint.init_from: {exc}", **{**exc.details,
                                                          "field": "checkpoint.init_from"}
                        ) from None
