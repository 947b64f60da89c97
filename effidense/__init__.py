"""effidense: memory-efficient DenseNets that compute exactly the plain model's function."""
from . import convert
from .densenet import MEMORY_MODES, DenseNet
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
    "CONFIGS", "MEMORY_MODES", "DenseNet", "convert", "SavedTensorMeter", "activation_floor_bytes", "cuda_peak_bytes",
    "saved_activation_bytes",
    "densenet40_k12", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
    "densenet_bc100_k12", "densenet_bc190_k40", "densenet_bc250_k24",
]
