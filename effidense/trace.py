"""Tracing and export: the model's one forward runs under ``torch.fx``, ``torch.export``, ONNX export and
``torch.jit.trace``, with segments simply run (see :mod:`effidense.layers.recompute`). Kept for its public names."""
from .densenet import SCRIPTING_UNSUPPORTED
from .layers.recompute import is_tracing

__all__ = ["SCRIPTING_UNSUPPORTED", "is_tracing"]
