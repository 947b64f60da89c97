"""The run directory: where it is, its lock, its summary, and clearing what an earlier run or a kill left there.

Rank 0 holds an exclusive POSIX record lock (``fcntl.lockf``) on ``RUN/.lock`` for the whole run, so a second run
into the same directory is refused. Unlike ``flock``, such a lock belongs to the process alone: data-loader workers
forked from it do not inherit it, so the moment a killed run dies its directory can be resumed.

A run that has no checkpoint to continue from starts again from the beginning only where that destroys nothing
(:func:`fresh_start_problem`): in a directory that does not exist yet, is empty, or holds no more than what a run
leaves before its first checkpoint.

``summary.csv`` has one row per epoch, in timm's columns (``epoch`` counted from 0, ``train_*``, ``eval_*``,
``lr``); it is rewritten atomically, never left with half a row, and is written here rather than by timm's
``update_summary``/``trim_summary``, which older timm releases lack or write without a header.
"""
from __future__ import annotations

import argparse
import contextlib
import csv
import fcntl
import io
import os
from collections.abc import Mapping
from datetime import datetime
from pathlib import Path

from timm.models import safe_model_name

from ..fileio import UnreadableFileError, load_safetensors
from .checkpoint import TrainingCheckpoint, checkpoint_files, settle, write_file
from .distributed import Processes, broadcast
from .errors import TrainError

__all__ = ["RUN_FILES", "LOCK_FILE", "ARGS_FILE", "run_directory", "lock_run_directory", "fresh_start_problem",
           "prepare_run_directory", "append_summary", "trim_summary"]

RUN_FILES = ("last.state.pt", "last.safetensors", "model_best.safetensors", "summary.csv")
LOCK_FILE = ".lock"
ARGS_FILE = "args.yaml"
# POSIX locks never conflict within one process: the run directories this process holds, for a second run in it.
_held: set[Path] = set()


def run_directory(args: argparse.Namespace, resume_path: Path | None, img_size: int, procs: Processes) -> Path:
    """``OUTPUT/EXPERIMENT``; a resumed run continues in its own directory unless --output/--experiment say so."""
    if resume_path is not None:
        return Path(args.output or resume_path.parent.parent) / (args.experiment or resume_path.parent.name)
    name = args.experiment or broadcast(
        "-".join([datetime.now().strftime("%Y%m%d-%H%M%S"), safe_model_name(args.model), str(img_size)]), procs)
    return Path(args.output or "./output/train") / name


def lock_run_directory(out: Path, procs: Processes, stack: contextlib.ExitStack) -> None:
    """Rank 0 creates ``out`` and holds an exclusive lock on ``out/.lock`` until ``stack`` closes; a second run into
    the same directory is refused (on every rank) instead of corrupting its files."""
    error = None
    if procs.primary:
        try:
            out.mkdir(parents=True, exist_ok=True)
            fd = os.open(out / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o666)
        except OSError as e:
            error = f"cannot create the run directory {out}: {e.strerror or e}"
        else:
            key = out.resolve()
            try:
                if key in _held:
                    raise BlockingIOError
                fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                os.close(fd)
                error = (f"another run is writing {out} (it holds {out / LOCK_FILE}); wait for it to end, or pick "
                         "another --output/--experiment")
            else:
                _held.add(key)
                stack.callback(_held.discard, key)
                stack.callback(os.close, fd)  # closing the descriptor releases the lock (the process's death too)
    error = broadcast(error, procs)
    if error:
        raise TrainError(error)


def _own_temporaries(out: Path) -> list[Path]:
    """Temporary files of the run's own atomic writes and checkpoint commits that a kill may have left in ``out``."""
    names = (*RUN_FILES, ARGS_FILE)
    return [*(p for p in checkpoint_files(out, "last")[2:] if p.exists()),
            *(p for p in out.glob(".*.tmp") if any(p.name.startswith(f".{name}.") for name in names))]


def _summary_epochs(path: Path) -> list[str]:
    rows = _read_rows(path)
    if not rows:
        return []
    return [row[0] for row in rows[1:]] if rows[0][:1] == ["epoch"] else ["not a summary of this trainer"]


def fresh_start_problem(out: Path) -> str | None:
    """Why starting a run from the beginning in ``out`` would destroy something (None when it would not).

    Nothing is destroyed in a directory that does not exist or is empty, nor in one holding only what a run leaves
    before its first checkpoint: its lock, its ``args.yaml``, temporaries of writes a kill cut short and, if it was
    killed between its first epoch's end and that epoch's checkpoint, epoch 0's summary row and best model (which
    starting again writes anew). Anything else (later epochs' results, files of another program) is listed.
    """
    if not out.is_dir():
        return None
    allowed = {out / LOCK_FILE, out / ARGS_FILE, *_own_temporaries(out)}
    problems = []
    summary, best = out / "summary.csv", out / "model_best.safetensors"
    if summary.exists():
        epochs = _summary_epochs(summary)
        if epochs and epochs != ["0"]:
            problems.append(f"summary.csv ({'epochs ' if epochs[0][:1].isdigit() else ''}{', '.join(epochs)})")
        allowed.add(summary)
    if best.exists():
        try:
            epoch = load_safetensors(best, tensors=False)[1].get("epoch")
        except UnreadableFileError:
            epoch = "unreadable"
        if epoch != "0":
            problems.append(f"model_best.safetensors (epoch {epoch})")
        allowed.add(best)
    problems += sorted(p.name + ("/" if p.is_dir() else "") for p in out.iterdir() if p not in allowed)
    return ", ".join(problems) or None


def prepare_run_directory(out: Path, checkpoint: TrainingCheckpoint | None, continuing: bool,
                          replace: bool) -> None:
    """Rank 0, under the lock: finish a commit a kill interrupted (``continuing`` from ``checkpoint``), or clear what
    an earlier run left behind (its files too when ``replace``)."""
    if continuing and checkpoint is not None:
        settle(checkpoint, out)
    else:
        if replace:
            for name in RUN_FILES:
                (out / name).unlink(missing_ok=True)
    for tmp in _own_temporaries(out):  # of writes a kill cut short (a first commit's files too); no one else's
        tmp.unlink(missing_ok=True)


def _read_rows(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return [row for row in csv.reader(f) if row]


def _write_rows(path: Path, rows: list[list[str]]) -> None:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    write_file(path, lambda tmp: Path(tmp).write_text(text.getvalue()))


def append_summary(path: Path, epoch: int, train_metrics: Mapping[str, float], eval_metrics: Mapping[str, float],
                   lr: float) -> None:
    """Add epoch ``epoch``'s row (timm's columns: epoch, train_*, eval_*, lr), atomically."""
    row = {"epoch": epoch, **{f"train_{k}": v for k, v in train_metrics.items()},
           **{f"eval_{k}": v for k, v in eval_metrics.items()}, "lr": lr}
    rows = _read_rows(path) or [list(row)]
    rows.append([str(value) for value in row.values()])
    _write_rows(path, rows)


def trim_summary(path: Path, epoch: int) -> None:
    """Drop the rows of epochs ``epoch`` and later (a resumed run writes them again), atomically."""
    rows = _read_rows(path)
    if not rows:
        return
    keep = [row for row in rows[1:] if row[0].isdigit() and int(row[0]) < epoch]
    if len(keep) < len(rows) - 1:
        _write_rows(path, [rows[0], *keep] if keep else [])
