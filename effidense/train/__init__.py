"""Training effidense (and any timm) models.

* Wrapper mode: :func:`run_timm_script` imports effidense and runs timm's own ``train.py``/``validate.py``/
  ``benchmark.py``/``inference.py`` (from a timm checkout) as ``__main__`` (``effidense timm SCRIPT ARGS...``);
  :func:`split_timm_script` finds ``--timm-script PATH`` or
  ``EFFIDENSE_TIMM_SCRIPT`` in a command line.
* Built-in mode: :func:`parse_args` reads the common timm ``train.py`` flags, :func:`train` runs them with
  timm's dataset, transform, optimizer, scheduler, loss and EMA parts, single-process or under torchrun.

``effidense train`` (``tools/train.py``) is the command line front for both; ``effidense timm`` for wrapper mode.
"""
from .args import TIMM_SCRIPT_ENV, args_to_yaml, build_parser, parse_args
from .checkpoint import load_training_checkpoint, resolve_resume
from .errors import TrainError, TrainingDiverged, TrainingInterrupted
from .trainer import build_model, train
from .wrapper import run_timm_script, split_timm_script

__all__ = ["TIMM_SCRIPT_ENV", "TrainError", "TrainingDiverged", "TrainingInterrupted", "args_to_yaml", "build_model",
           "build_parser", "load_training_checkpoint", "parse_args", "resolve_resume", "run_timm_script",
           "split_timm_script", "train"]
