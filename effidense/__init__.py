"""effidense: memory-efficient DenseNets that compute exactly the plain model's function.

Where a change belongs:

* the network (layers, blocks, transitions, memory modes, compile scopes, 1-3 spatial dims): :mod:`effidense.densenet`
* the exact norm (recomputation, SyncBatchNorm, regional compilation), where segments are recomputed, pooling that
  keeps no input: :mod:`effidense.layers`
* named configurations, builders, timm registry and pretrained tags: :mod:`effidense.registry`
* checkpoint keys, safe state-dict reading and writing: :mod:`effidense.weights`; architecture inference and
  conversion between layouts: :mod:`effidense.convert`; atomic writes and safe loads for every tool:
  :mod:`effidense.fileio`
* the memory meter: :mod:`effidense.memory`; benchmarks: :mod:`effidense.benchmark`; exactness checks:
  :mod:`effidense.verify`; the GPU evidence run: :mod:`effidense.gpu_report`; the built-in trainer:
  :mod:`effidense.train`
* the commands (``effidense bench|convert|gradcheck|train|...``, ``tools/*.py``): :mod:`effidense.cli`
* MONAI's DenseNet as a drop-in (``from effidense.monai import DenseNet121``; not imported here, and MONAI is not
  needed for it): :mod:`effidense.monai`
"""
from . import convert
from .densenet import MEMORY_MODES, DenseBlock, DenseNet
from .memory import SavedTensorMeter, activation_floor_bytes, cuda_peak_bytes, saved_activation_bytes
from .registry import (
    CONFIGS,
    densenet40_k12,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet264,
    densenet_bc100_k12,
    densenet_bc190_k40,
    densenet_bc250_k24,
)

__version__ = "0.1.0"

__all__ = [
    "CONFIGS", "MEMORY_MODES", "DenseBlock", "DenseNet", "convert", "SavedTensorMeter", "activation_floor_bytes",
    "cuda_peak_bytes", "saved_activation_bytes",
    "densenet40_k12", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
    "densenet_bc100_k12", "densenet_bc190_k40", "densenet_bc250_k24",
]
