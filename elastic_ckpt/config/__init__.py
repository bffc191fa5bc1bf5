"""Configuration: pydantic models validated once, YAML loading. Imports neither torch.distributed
nor ray."""

from elastic_ckpt.config.loading import dump_config, load_config, validate_config
from elastic_ckpt.config.schema import (
    CheckpointConfig,
    DataConfig,
    EvalConfig,
    FailureConfig,
    HFModelConfig,
    LoggingConfig,
    ModelConfig,
    OptimConfig,
    ParallelConfig,
    ParquetDatasetConfig,
    ScalingConfig,
    SyntheticDatasetConfig,
    TrainConfig,
)

__all__ = ["CheckpointConfig", "DataConfig", "EvalConfig", "FailureConfig", "HFModelConfig",
           "LoggingConfig", "ModelConfig", "OptimConfig", "ParallelConfig", "ParquetDatasetConfig",
           "ScalingConfig", "SyntheticDatasetConfig", "TrainConfig", "dump_config",
           "load_config", "validate_config"]
