"""The layers effidense's DenseNets are made of: norms (+ activation) that stay exact under recomputation
(:mod:`.norm`), the light autograd Functions their segments rerun in (:mod:`.light`), the one place segments are
checkpointed (:mod:`.recompute`) and pooling that keeps no input (:mod:`.pool`), each for 1, 2 or 3 spatial dims."""
from .norm import (
    BATCH_NORM_ACT,
    INSTANCE_NORM_ACT,
    Activation,
    AdoptsNorms,
    BatchNormAct,
    GroupNormAct,
    NormAct,
    SyncBatchNormAct,
    SyncBatchNormWithStats,
    relu_,
)
from .pool import AvgPool, MaxPool
from .recompute import checkpointed, fx_leaf, is_tracing, recomputing, run_mode

__all__ = ["Activation", "BATCH_NORM_ACT", "INSTANCE_NORM_ACT", "AdoptsNorms", "AvgPool", "BatchNormAct",
           "GroupNormAct", "MaxPool", "NormAct", "SyncBatchNormAct", "SyncBatchNormWithStats",
           "checkpointed", "fx_leaf", "is_tracing", "recomputing", "relu_", "run_mode"]
