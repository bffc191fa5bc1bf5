"""One rank's training: process group, mesh, ``fully_shard``, restore, step loop, checkpoints.

May import errors, config, storage, checkpoint, data and torch; never ray, and decides nothing
about scaling.
"""

from elastic_ckpt.train.distributed import RankSpec, apply_fsdp, device_mesh, process_group
from elastic_ckpt.train.loop import RankHooks, RankResult, RankTrainer, StepMetrics, TrainJob
from elastic_ckpt.train.model import GPT, build_gpt, lm_loss
from elastic_ckpt.train.schedule import lr_at

__all__ = ["GPT", "RankHooks", "RankResult", "RankSpec", "RankTrainer", "StepMetrics", "TrainJob",
           "apply_fsdp", "build_gpt", "device_mesh", "lm_loss", "lr_at", "process_group"]
