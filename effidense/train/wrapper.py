"""Wrapper mode: run timm's own ``train.py`` / ``validate.py`` / ``benchmark.py`` / ``inference.py`` with effidense's
models registered (``effidense timm SCRIPT ARGS...``, or ``effidense train --timm-script SCRIPT ARGS...``).

The timm wheel ships neither script (they live in the timm git repository), and ``validate.py`` has no
``--device-modules`` flag, so the wrapper imports effidense first and then runs the script as ``__main__``
with the remaining arguments. Under ``torchrun`` every process does the same, so DDP works unchanged.
"""
from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

from .args import TIMM_SCRIPT_ENV
from .errors import TrainError

__all__ = ["split_timm_script", "run_timm_script"]

_FLAG = "--timm-script"


def split_timm_script(argv: Sequence[str], environ: Mapping[str, str] | None = None) -> tuple[str | None, list[str]]:
    """Take ``--timm-script PATH`` (or ``--timm-script=PATH``) out of ``argv``.

    Returns the script (falling back to the ``EFFIDENSE_TIMM_SCRIPT`` environment variable) and the arguments
    left for it; the script is None when neither names one, which selects the built-in trainer.
    """
    environ = os.environ if environ is None else environ
    rest = list(argv)
    for i, arg in enumerate(rest):
        if arg == _FLAG:
            if i + 1 >= len(rest):
                raise TrainError(f"{_FLAG} needs a path to timm's train.py or validate.py")
            return rest[i + 1], rest[:i] + rest[i + 2:]
        if arg.startswith(_FLAG + "="):
            return arg.split("=", 1)[1], rest[:i] + rest[i + 1:]
    return environ.get(TIMM_SCRIPT_ENV) or None, rest


def run_timm_script(script: str | os.PathLike[str], argv: Sequence[str]) -> int:
    """Import effidense, then run ``script`` as ``__main__`` with ``argv``; returns its exit status."""
    path = Path(script)
    if not path.is_file():
        raise TrainError(f"{script}: no such file (timm's train.py, validate.py, benchmark.py or inference.py from a "
                         "timm checkout; the timm wheel does not ship them)")
    import effidense  # noqa: F401  (registers the effi_* models with timm before the script creates one)

    saved_argv, saved_path = sys.argv, list(sys.path)
    sys.argv = [str(path), *argv]
    # As `python script.py` would: the script's folder first on sys.path, for its sibling imports.
    sys.path.insert(0, str(path.resolve().parent))
    try:
        runpy.run_path(str(path), run_name="__main__")
    except SystemExit as e:
        if e.code is None or isinstance(e.code, int):
            return e.code or 0
        print(e.code, file=sys.stderr)
        return 1
    finally:
        sys.argv, sys.path[:] = saved_argv, saved_path
    return 0
