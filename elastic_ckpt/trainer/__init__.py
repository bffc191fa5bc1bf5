"""``ElasticTrainer`` and ``Result``: the user-facing entry point."""

from elastic_ckpt.coordinator.coordinator import Progress
from elastic_ckpt.trainer.elastic_trainer import ElasticTrainer, Result, dataset_from_config

__all__ = ["ElasticTrainer", "Progress", "Result", "dataset_from_config"]
