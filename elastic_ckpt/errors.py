"""The typed error taxonomy. Every layer raises these so callers can act on the type.

Each error message says what failed, where (file, tensor, rank, field) and what to do next.
Errors survive pickling (DCP gathers per-rank exceptions to every rank; Ray ships them
between processes) with their extra attributes intact.
"""

from __future__ import annotations


class ElasticCkptError(Exception):
    """Base class of every error this package raises on purpose."""

    def __init__(self, message: str, **details: object) -> None:
        super().__init__(message)
        self.message = message
        self.details = details
        for key, value in details.items():
            setattr(self, key, value)

    def __reduce__(self):  # keep ``details`` across pickling (DCP gathers, Ray RPC)
        return (_rebuild, (type(self), self.message, self.details))

    def __str__(self) -> str:
        return self.message


def _rebuild(cls: type, message: str, details: dict) -> ElasticCkptError:
    return cls(message, **details)


class ConfigError(ElasticCkptError, ValueError):
    """A configuration file or value is invalid; the message names the field."""


class StorageError(ElasticCkptError, OSError):
    """The storage backend failed (I/O error, unreachable bucket, bad URI)."""


class CheckpointError(ElasticCkptError):
    """Base class for checkpoint problems."""


class CheckpointNotFoundError(CheckpointError, FileNotFoundError):
    """No committed checkpoint exists at the requested location or step."""


class CheckpointNotCommittedError(CheckpointError):
    """The checkpoint directory exists but has no COMMITTED marker (a crashed or running save)."""


class CheckpointCorruptError(CheckpointError):
    """Bytes on storage do not match the manifest: checksum mismatch, truncation, missing file,
    or a manifest that is malformed or points outside its checkpoint directory."""


class CheckpointMismatchError(CheckpointError):
    """The checkpoint is intact but does not fit the state being loaded (missing tensor,
    wrong shape or dtype)."""


class CheckpointSaveError(CheckpointError):
    """A save failed; the previous committed checkpoint is untouched."""


class NotCheckpointableError(CheckpointSaveError, TypeError):
    """A non-tensor value in the state is not JSON-able (bytes, ``BytesIO``, a set, an
    arbitrary object): checkpoints store such values as JSON and never pickle. ``key`` names
    it (the dotted path to the offending part)."""


class WeightsError(CheckpointError):
    """Pretrained weights cannot be opened or read as asked: nothing recognizable at the URI,
    a tensor name that is not there, rows outside the tensor, or a file holding something
    other than a flat dict of tensors. The message names the file and tensor."""


class WeightsCorruptError(WeightsError, CheckpointCorruptError):
    """A weights file is malformed: a truncated file, or a safetensors header that is not
    valid JSON, has unknown fields, or points outside the file. Re-download or re-export it."""


class TrainingFailedError(ElasticCkptError):
    """``fit()`` gave up: failures exceeded ``failure.max_failures``, a fatal error, or fewer
    than ``min_workers`` fit for ``capacity_timeout_s``. The message names the last committed
    checkpoint, which is intact."""


class TrainingStoppedError(ElasticCkptError):
    """``fit()`` was stopped by ``ElasticTrainer.stop()`` (``jobs/train.py`` calls it on
    SIGTERM, e.g. ``ray job stop``, and on Ctrl-C): the run's actors were killed, nothing was
    committed after that, and the message names the last committed checkpoint to resume from.
    ``reason`` says who stopped it."""


class SharedStorageError(StorageError):
    """A local-path ``checkpoint.uri`` is not one filesystem across the group's nodes: a rank
    on another node cannot see what rank 0 wrote. Use shared storage (NFS, Lustre, a mounted
    bucket) at the same path on every node, or an object store (``s3://``, ``gs://``)."""


class RankError(ElasticCkptError):
    """Training code raised on a rank. Carries where (rank, the step being trained, the step
    the group restored from) and what (the exception's type, message and traceback as text),
    so the runtime can tell a deterministic bug from a transient failure."""


class RunDirError(ElasticCkptError):
    """A run directory (``run_dir``: ``events.jsonl``, ``metrics.jsonl``) cannot be read: it is
    missing, has no ``events.jsonl``, or a line is malformed (the message names the file and
    line number)."""


class CheckpointLeaseError(CheckpointError):
    """Another job holds the checkpoint root's lease (or took it over from this one): two
    writers must never interleave saves under one root."""


class CheckpointSavesFailedError(CheckpointSaveError):
    """``checkpoint.max_failed_saves`` saves in a row failed in the background (disk full, an
    object store down): the run stops rather than train on without checkpoints. The message
    names the last cause and the last committed checkpoint."""
