"""The layers effidense's DenseNets are made of, for 1, 2 or 3 spatial dims: norms (+ activation) exact under
recomputation (:mod:`.norm`), segments and the light autograd Functions they rerun in (:mod:`.light`), the masks they
keep at a bit an element or draw again (:mod:`.masks`), gradients summed where a map's readers are (:mod:`.gather`),
the one place segments are checkpointed (:mod:`.recompute`), pooling that keeps no input (:mod:`.pool`), and the
memory mode every layer has (:mod:`.mode`)."""
from .norm import (
                   BATCH_NORM_ACT,
                   INSTANCE_NORM_ACT,
                   Activation,
                   AdoptsNorms,
                   BatchNormAct,
                   GroupNormAct,
                   NormAct,
                   SyncBatchNormAct,
                   relu_,
)
from .pool import AvgPool, MaxPool
from .recompute import checkpointed, is_tracing, recomputing

__all__ = ["Activation", "BATCH_NORM_ACT", "INSTANCE_NORM_ACT", "AdoptsNorms", "AvgPool", "BatchNormAct",
           "GroupNormAct", "MaxPool", "NormAct", "SyncBatchNormAct", "checkpointed", "is_tracing", "recomputing",
           "relu_"]
