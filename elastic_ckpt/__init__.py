"""elastic_ckpt: elastic FSDP2 training on Ray with re-shardable distributed checkpoints."""

from elastic_ckpt.errors import (
    CheckpointCorruptError,
    CheckpointLeaseError,
    CheckpointError,
    CheckpointMismatchError,
    CheckpointNotCommittedError,
    CheckpointNotFoundError,
    ConfigError,
    ElasticCkptError,
    StorageError,
    TrainingFailedError,
    TrainingStoppedError,
    WeightsCorruptError,
    WeightsError,
)

__version__ = "0.1.0"

_LAZY = {
    "CheckpointManager": "elastic_ckpt.checkpoint.manager",
    "CheckpointInfo": "elastic_ckpt.checkpoint.manager",
    "AppState": "elastic_ckpt.checkpoint.app_state",
    "verify": "elastic_ckpt.checkpoint.verify",
    "ElasticTrainer": "elastic_ckpt.trainer",
    "Result": "elastic_ckpt.trainer",
    "Progress": "elastic_ckpt.trainer",
    "TrainConfig": "elastic_ckpt.config",
}


def __getattr__(name: str):
    # Import the heavy layers (torch.distributed, ray) only when asked for.
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'elastic_ckpt' has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(module), name)


__all__ = [
    "AppState",
    "CheckpointCorruptError",
    "CheckpointLeaseError",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointNotCommittedError",
    "CheckpointNotFoundError",
    "ConfigError",
    "ElasticCkptError",
    "ElasticTrainer",
    "Progress",
    "Result",
    "StorageError",
    "TrainConfig",
    "TrainingFailedError",
    "TrainingStoppedError",
    "WeightsCorruptError",
    "WeightsError",
    "verify",
]
