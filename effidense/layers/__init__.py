"""Reusable layers: BatchNorm-ReLU that stays exact under recomputation (:mod:`.norm_act`) and pooling that keeps no
input (:mod:`.pool`)."""
from .norm_act import BatchNormWithStats, SyncBatchNormWithStats, bn_relu, shared_stats, update_running_stats
from .pool import avg_pool, max_pool

__all__ = ["BatchNormWithStats", "SyncBatchNormWithStats", "avg_pool", "bn_relu", "max_pool", "shared_stats",
           "update_running_stats"]
