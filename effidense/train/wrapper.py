"""Wrapper mode: run timm's own ``train.py`` / ``validate.py`` / ``benchmark.py`` / ``inference.py`` with effidense's
models registered: ``effidense timm SCRIPT ARGS...``, effidense's one route to timm's scripts.

The timm wheel ships none of these scripts (they live in the timm git repository). timm's ``train.py`` has its own
``--device-modules effidense``, which imports effidense (registering the models) before it creates one;
``validate.py``, ``benchmark.py`` and ``inference.py`` have no such flag, so this route serves all four: it imports
effidense first, then runs the script as ``__main__`` with the remaining arguments. Under ``torchrun`` every process
does the same, so DDP works unchanged.
"""
from __future__ import annotations

import os
import runpy
import sys
from collections.abc import Sequence
from pathlib import Path

from .args import dropped_by_timm
from .errors import TrainError

__all__ = ["run_timm_script"]

def run_timm_script(script: str | os.PathLike[str], argv: Sequence[str]) -> int:
    """Import effidense, then run ``script`` as ``__main__`` with ``argv``; returns its exit status."""
    path = Path(script)
    if not path.is_file():
        raise TrainError(f"{script}: no such file (timm's train.py, validate.py, benchmark.py or inference.py from a "
                         "timm checkout; the timm wheel does not ship them)")
    none = _none_model_kwargs(argv)
    if none:
        raise TrainError(dropped_by_timm(none))
    import effidense.registry  # noqa: F401  (registers the effi_* models with timm before the script creates one)

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


def _none_model_kwargs(argv: Sequence[str]) -> list[str]:
    """The keys that timm's ``--model-kwargs KEY=VALUE ...`` sets to None (which its create_model then drops)."""
    keys, within = [], False
    for arg in argv:
        if arg.startswith("-"):
            within = arg == "--model-kwargs"
        elif within and arg.partition("=")[2].strip() == "None":
            keys.append(arg.partition("=")[0])
    return keys
