"""One rank's training: process group, mesh, the user's builders (``TrainSpec``), sharding,
initialization, restore or pretrained start, the step loop, eval, checkpoints.

May import errors, config, storage, checkpoint, data and torch; never ray, and decides nothing
about scaling.
"""

from elastic_ckpt.train.distributed import RankSpec, device_mesh, process_group
from elastic_ckpt.train.events import (
    CheckpointCommitted,
    CheckpointFailed,
    CheckpointStaged,
    FirstStep,
    Phase,
    RankEvent,
    Rendezvous,
    Restored,
)
from elastic_ckpt.train.job import (
    EvalMetrics,
    LossFn,
    RankHooks,
    RankResult,
    StepMetrics,
    TrainJob,
    TrainSpec,
    default_model,
)
from elastic_ckpt.train.loop import RankTrainer
from elastic_ckpt.train.model import GPT, build_gpt, lm_loss
from elastic_ckpt.train.optim import builtin_lr_scheduler, default_optimizer
from elastic_ckpt.train.parallelize import default_parallelize, fsdp_units, shard_units
from elastic_ckpt.train.schedule import lr_at

__all__ = ["CheckpointCommitted", "CheckpointFailed", "CheckpointStaged", "FirstStep", "Phase",
           "RankEvent", "Rendezvous", "Restored",
           "GPT", "EvalMetrics", "LossFn", "RankHooks", "RankResult", "RankSpec", "RankTrainer",
           "StepMetrics", "TrainJob", "TrainSpec", "build_gpt", "builtin_lr_scheduler",
           "default_model", "default_optimizer", "default_parallelize", "device_mesh",
           "fsdp_units", "lm_loss", "lr_at", "process_group", "shard_units"]
