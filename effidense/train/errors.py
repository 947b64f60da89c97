"""Errors the trainer reports to users as one line (``tools/train.py`` prints them and exits with status 1)."""
from __future__ import annotations

__all__ = ["TrainError", "TrainingDiverged", "TrainingInterrupted"]


class TrainError(Exception):
    """A problem with the arguments, the data or the output directory, found before or during training."""


class TrainingDiverged(TrainError):
    """The loss became NaN or infinite; the run stopped without saving anything after the last good checkpoint."""


class TrainingInterrupted(TrainError):
    """Ctrl-C: the file being written was finished first; the run can continue from its last complete checkpoint."""
