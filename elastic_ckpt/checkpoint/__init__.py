"""Distributed checkpoints: per-rank shards, a JSON manifest, exact re-sharding at any world size.

May import ``elastic_ckpt.errors``, ``elastic_ckpt.config``, ``elastic_ckpt.storage`` and torch;
never ray.
"""

from elastic_ckpt.checkpoint.app_state import AppState
from elastic_ckpt.checkpoint.catalog import Catalog, CheckpointInfo, open_checkpoint
from elastic_ckpt.checkpoint.manager import CheckpointManager
from elastic_ckpt.checkpoint.manifest import Manifest
from elastic_ckpt.checkpoint.planners import JsonLoadPlanner, JsonSavePlanner
from elastic_ckpt.checkpoint.reader import ShardReader
from elastic_ckpt.checkpoint.verify import verify
from elastic_ckpt.checkpoint.weights import TensorInfo, WeightSource, open_weights
from elastic_ckpt.checkpoint.writer import ShardWriter

__all__ = ["AppState", "Catalog", "CheckpointInfo", "CheckpointManager", "JsonLoadPlanner",
           "JsonSavePlanner", "Manifest", "ShardReader", "ShardWriter", "TensorInfo",
           "WeightSource", "open_checkpoint", "open_weights", "verify"]
