"""Training effidense (and any timm) models.

* Wrapper mode: :func:`run_timm_script` imports effidense and runs timm's own ``train.py``/``validate.py``/
  ``benchmark.py``/``inference.py`` (from a timm checkout) as ``__main__`` (``effidense timm SCRIPT ARGS...``, the
  one route; timm's own ``train.py --device-modules effidense`` registers the models too).
* Built-in mode: :func:`parse_args` reads the common timm ``train.py`` flags, :func:`train` runs them with
  timm's dataset, transform, optimizer, scheduler, loss and EMA parts, single-process or under torchrun.

``effidense train`` (``tools/train.py``) is the command line front of built-in mode; ``effidense timm`` of wrapper
mode.
"""
from __future__ import annotations

from ..lazy import lazy_exports

# name -> the module that defines it, imported on first use: `effidense train --help` reads the arguments (.args)
# without the trainer's torch and timm
_EXPORTS = {
    **dict.fromkeys(["args_to_yaml", "build_parser", "parse_args"], "args"),
    **dict.fromkeys(["load_training_checkpoint", "resolve_resume"], "checkpoint"),
    **dict.fromkeys(["TrainError", "TrainingDiverged", "TrainingInterrupted"], "errors"),
    "build_model": "model",
    "train": "trainer",
    "run_timm_script": "wrapper",
}

__all__ = sorted(_EXPORTS)


__getattr__ = lazy_exports(__name__, _EXPORTS)


def __dir__() -> list[str]:
    return __all__
