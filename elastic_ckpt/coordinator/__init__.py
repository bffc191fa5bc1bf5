"""The elastic runtime: cluster view, pure scaling/failure policies, the coordinator state
machine and the worker group of Ray actors. Tensors never pass through it."""

from elastic_ckpt.coordinator.cluster import ClusterSnapshot, ClusterView, NodeView
from elastic_ckpt.coordinator.coordinator import Coordinator, CoordinatorResult
from elastic_ckpt.coordinator.events import FailureNotice, ScalingEvent, Timeline
from elastic_ckpt.coordinator.policy import (
    Failure,
    FailureDecision,
    FailureKind,
    FailurePolicy,
    NoopDecision,
    Observation,
    ResizeDecision,
    ScalingPolicy,
)
from elastic_ckpt.coordinator.worker import TrainWorker

__all__ = ["ClusterSnapshot", "ClusterView", "Coordinator", "CoordinatorResult", "Failure",
           "FailureDecision", "FailureKind", "FailureNotice", "FailurePolicy", "NodeView",
           "NoopDecision", "Observation", "ResizeDecision", "ScalingEvent", "ScalingPolicy",
           "Timeline", "TrainWorker"]
