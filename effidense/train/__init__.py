"""Training effidense (and any timm) models.

* Wrapper mode: :func:`run_timm_script` imports effidense and runs timm's own ``train.py``/``validate.py``/
  ``benchmark.py``/``inference.py`` (from a timm checkout) as ``__main__`` (``effidense timm SCRIPT ARGS...``, the
  one route; timm's own ``train.py --device-modules effidense`` registers the models too).
* Built-in mode: :func:`parse_args` reads the common timm ``train.py`` flags, :func:`train` runs them with
  timm's dataset, transform, optimizer, scheduler, loss and EMA parts, single-process or under torchrun.

``effidense train`` (``tools/train.py``) is the command line front of built-in mode; ``effidense timm`` of wrapper
mode.
"""
from .. import registry  # noqa: F401 (the trainer creates effi_* models through timm)
from .args import args_to_yaml, build_parser, parse_args
from .checkpoint import load_training_checkpoint, resolve_resume
from .errors import TrainError, TrainingDiverged, TrainingInterrupted
from .model import build_model
from .trainer import train
from .wrapper import run_timm_script

__all__ = ["TrainError", "TrainingDiverged", "TrainingInterrupted", "args_to_yaml", "build_model", "build_parser",
           "load_training_checkpoint", "parse_args", "resolve_resume", "run_timm_script", "train"]
