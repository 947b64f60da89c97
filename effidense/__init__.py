"""effidense: memory-efficient DenseNets that compute exactly the plain model's function.

Where a change belongs:

* the network (layers, blocks, transitions, memory modes, compilation, 1-3 spatial dims): :mod:`effidense.densenet`
* the exact norm (recomputation, SyncBatchNorm), where segments are recomputed, pooling that keeps no input:
  :mod:`effidense.layers`
* FC-DenseNet ("Tiramisu") for segmentation, built on the dense blocks: :mod:`effidense.fcdensenet`
* named configurations, builders, timm registry and pretrained tags: :mod:`effidense.registry`
* checkpoint keys, safe state-dict reading and writing: :mod:`effidense.weights`; architecture inference and
  conversion between layouts: :mod:`effidense.convert`; atomic writes and safe loads for every tool:
  :mod:`effidense.fileio`
* the memory meter and the allocator's peak: :mod:`effidense.memory`; what every tool runs a model with (the one
  training step, the variants and peers, a step's memory on fake tensors): :mod:`effidense.harness`; the memory
  planner (``effidense.plan``, loaded on first use): :mod:`effidense.planner`; benchmarks: :mod:`effidense.benchmark`;
  exactness checks: :mod:`effidense.verify`; the GPU evidence run: :mod:`effidense.gpu_report`; the built-in trainer:
  :mod:`effidense.train`
* pretrained weights offline (torchvision's and the hub's caches): :mod:`effidense.pretrained`; adapting weights
  (inflation, input channels, a fresh head): :mod:`effidense.adapt`
* the commands (``effidense bench|convert|gradcheck|train|...``, ``tools/*.py``): :mod:`effidense.cli`
* MONAI's DenseNet as a drop-in (``from effidense.monai import DenseNet121``; not imported here, and MONAI is not
  needed for it): :mod:`effidense.monai`
"""
from __future__ import annotations

import os
import sys

from .lazy import lazy_exports

_BUILDERS = ["densenet40_k12", "densenet121", "densenet161", "densenet169", "densenet201", "densenet264",
             "densenet_bc100_k12", "densenet_bc190_k40", "densenet_bc250_k24"]
_SEGMENTATION = ["fcdensenet56", "fcdensenet67", "fcdensenet103"]
_NORMS = ["NormAct", "BatchNormAct1d", "BatchNormAct2d", "BatchNormAct3d", "SyncBatchNormAct", "GroupNormAct",
          "InstanceNormAct1d", "InstanceNormAct2d", "InstanceNormAct3d"]

# name -> the module that defines it; `effidense.<name>` imports that module on first use
_EXPORTS = {
    **dict.fromkeys(["DenseNet", "DenseBlock", "DenseLayer", "Transition", "MEMORY_MODES"], "densenet"),
    **dict.fromkeys(_BUILDERS, "registry"),
    **dict.fromkeys(["FCDenseNet", *_SEGMENTATION], "fcdensenet"),
    **dict.fromkeys(_NORMS, "layers.norm"),
    **dict.fromkeys(["SavedTensorMeter", "saved_activation_bytes", "activation_floor_bytes", "cuda_peak_bytes"],
                    "memory"),
    "CONFIGS": "configs",
    "plan": "planner",  # the planner imports the harness's peers (torchvision): loaded on first use like the rest
}


__getattr__ = lazy_exports(__name__, _EXPORTS, modules=("convert",))


def _imported_by_the_command() -> bool:
    """True when this import is the ``effidense`` command's own (the console script, ``python -m effidense``, or a
    ``tools/*.py`` front, which sets ``EFFIDENSE_COMMAND``): it loads torch and timm only for the command that needs
    them, so that ``--help`` and usage errors are instant."""
    argv0 = sys.argv[0] if sys.argv else ""
    if os.path.basename(argv0) in ("effidense", "effidense.exe"):
        return True
    if getattr(sys.modules.get("__main__"), "EFFIDENSE_COMMAND", False) is True:
        return True
    orig = getattr(sys, "orig_argv", [])
    return argv0 == "-m" and any(a == "-m" and b == "effidense" for a, b in zip(orig, orig[1:], strict=False))


if not _imported_by_the_command():
    # `import effidense` registers the effi_* models with timm (timm.create_model('effi_densenet121'), timm's
    # `--device-modules effidense`); the commands import effidense.registry themselves where they need it.
    from . import registry  # noqa: F401

__version__ = "0.1.0"

# The public face: the models (classifiers and FC-DenseNet), their parts, the norms a norm_layer= may make, the
# meter, the planner and the converter. MEMORY_MODES, CONFIGS, activation_floor_bytes and cuda_peak_bytes stay
# reachable as attributes for the docs that name them.
__all__ = [
    "DenseNet", "DenseBlock", "DenseLayer", "Transition", *_BUILDERS, "FCDenseNet", *_SEGMENTATION, *_NORMS,
    "SavedTensorMeter", "saved_activation_bytes", "plan", "convert",
]


def __dir__() -> list[str]:
    return sorted([*__all__, "__version__"])
