"""Checkpoints of the built-in trainer: model weights as safetensors plus a training-state file, committed as one unit.

``NAME.safetensors`` holds the model weights (loadable by timm's ``--initial-checkpoint``/``--pretrained-path`` and
by safetensors alone); ``NAME.state.pt`` holds what a resumed run needs (optimizer, scheduler, scaler, EMA weights,
epoch, batch, step, RNG states, best metric) as plain tensors and Python values, so it loads with
``torch.load(weights_only=True)``.

Commit protocol (:func:`save_training_checkpoint`), built on :mod:`effidense.fileio`'s atomic writer: both files
carry the same random commit id and the position (epoch/batch/step).

1. write ``NAME.state.pt.tmp`` completely and fsync it (:func:`effidense.fileio.write_complete`);
2. the same for ``NAME.safetensors.tmp``;
3. publish the weights (:func:`effidense.fileio.publish`, an ``os.replace``), 4. publish the state.

A write that fails (a full disk) removes both temporary files and raises :class:`TrainError` naming the file; the
previous checkpoint stays. Ctrl-C during a commit waits for the commit to end.

Reading (:func:`find_checkpoint`) looks at all four files, keeps those that read completely, pairs weights and state by
their commit id, and takes the newest pair. A kill before step 3 leaves the previous pair published; after step 3 the
published weights pair with the complete state ``.tmp``. So a kill at any instant leaves the previous or the new
complete checkpoint. Before a resumed run writes again, :func:`settle` finishes an interrupted commit (steps 3-4) and
removes left-over ``.tmp`` files, so the next commit never overwrites the newest pair. A directory in which no
published file exists yet (a kill during the first commit) has no checkpoint: resuming it starts from the beginning.
"""
from __future__ import annotations

import contextlib
import os
import random
import signal
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import save_file

from ..fileio import (
    UnreadableFileError,
    atomic_write,
    interrupts_deferred,
    load_safetensors,
    load_torch_file,
    publish,
    save_torch_file,
    write_complete,
    write_failure,
)
from .errors import TrainError

__all__ = ["STATE_FORMAT", "TrainingCheckpoint", "fault_point", "find_checkpoint", "write_file", "save_weights",
           "save_training_checkpoint", "settle", "resolve_resume", "load_training_checkpoint", "rng_state",
           "set_rng_state", "state_problem", "weights_path_for", "checkpoint_files", "all_finite"]

STATE_FORMAT = "effidense-train-state/1"
_STATE_SUFFIX = ".state.pt"
_TMP = ".tmp"

# Testing hook: a process with EFFIDENSE_TEST_KILL_AT_WRITE=N SIGKILLs itself at the N-th write point (counted in
# _fault_count). A point given a file truncates it to half first: a kill in the middle of writing that file.
_FAULT_ENV = "EFFIDENSE_TEST_KILL_AT_WRITE"
_fault_count = 0


def fault_point(partial: Path | str | None = None) -> None:
    """Count a write point; at the one ``EFFIDENSE_TEST_KILL_AT_WRITE`` names, cut ``partial`` short and SIGKILL."""
    global _fault_count
    target = os.environ.get(_FAULT_ENV)
    if not target:
        return
    _fault_count += 1
    if _fault_count == int(target):
        if partial is not None and os.path.exists(partial):
            os.truncate(partial, os.path.getsize(partial) // 2)
        os.kill(os.getpid(), signal.SIGKILL)


# What a failed write raises: OSError (a full disk), torch.save's RuntimeError, safetensors' own error.
_WRITE_ERRORS = (OSError, RuntimeError, SafetensorError)


def _write_error(path: Path, error: BaseException) -> TrainError:
    return TrainError(f"cannot write {path}: {write_failure(error)}")


def write_file(path: Path, write: Callable[[str], None]) -> None:
    """:func:`effidense.fileio.atomic_write` with the trainer's test write points (inside the write, after it); a
    failed write (a full disk) raises :class:`TrainError` naming ``path`` and leaves no temporary file."""
    def write_then_fault(tmp: str) -> None:
        write(tmp)
        fault_point(tmp)

    try:
        atomic_write(path, write_then_fault)
    except _WRITE_ERRORS as e:
        raise _write_error(path, e) from None
    fault_point()


def _position(state: Mapping[str, Any]) -> str:
    return f"{state['epoch']}/{state['batch']}/{state['step']}"


def _position_key(position: str) -> tuple[int, ...]:
    return tuple(int(part) for part in position.split("/"))


def all_finite(tensors: Mapping[str, torch.Tensor] | None) -> bool:
    """Whether every floating-point tensor of a state dict is finite (NaN or inf make a checkpoint no good)."""
    return tensors is None or all(bool(torch.isfinite(t).all()) for t in tensors.values() if t.is_floating_point())


def _write_weights(tmp: str, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> None:
    save_file(dict(tensors), tmp, metadata={"format": "pt", **metadata})


def _cpu(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}


def save_weights(path: Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a state dict as safetensors, atomically."""
    tensors = _cpu(state_dict)
    write_file(path, lambda tmp: _write_weights(tmp, tensors, metadata or {}))


def weights_path_for(state_path: Path) -> Path:
    return state_path.with_name(state_path.name[: -len(_STATE_SUFFIX)] + ".safetensors")


def checkpoint_files(directory: Path, name: str) -> list[Path]:
    """The published and temporary files of checkpoint ``name``: weights, state, weights.tmp, state.tmp."""
    weights, state = directory / f"{name}.safetensors", directory / f"{name}{_STATE_SUFFIX}"
    return [weights, state, weights.with_name(weights.name + _TMP), state.with_name(state.name + _TMP)]


def save_training_checkpoint(directory: Path, name: str, model_state: Mapping[str, torch.Tensor],
                             train_state: dict[str, Any]) -> Path:
    """Commit ``NAME.safetensors`` and ``NAME.state.pt`` in ``directory`` as one unit; returns the state file's path.

    The caller must have settled the directory (:func:`settle`) since it last resumed from it.
    """
    commit = uuid.uuid4().hex  # pairs the two files of this commit, never those of another run or commit
    train_state = {"format": STATE_FORMAT, "commit": commit, **train_state}
    weights, state, weights_tmp, state_tmp = checkpoint_files(directory, name)
    tensors = _cpu(model_state)
    metadata = {"position": _position(train_state), "commit": commit, "model": str(train_state.get("model", ""))}
    with interrupts_deferred():
        writing = state
        try:
            write_complete(state_tmp, lambda tmp: save_torch_file(train_state, tmp))
            fault_point(state_tmp)
            fault_point()
            writing = weights
            write_complete(weights_tmp, lambda tmp: _write_weights(tmp, tensors, metadata))
            fault_point(weights_tmp)
            fault_point()
        except BaseException as e:  # nothing is published yet: discard both temporaries, the previous pair stays
            for tmp in (state_tmp, weights_tmp):
                with contextlib.suppress(OSError):
                    os.remove(tmp)
            if isinstance(e, _WRITE_ERRORS):
                raise _write_error(writing, e) from None
            raise
        publish(weights_tmp, weights)
        fault_point()
        publish(state_tmp, state)
        fault_point()
    return state


@dataclass
class TrainingCheckpoint:
    """A complete checkpoint found on disk: its two files, weights, training state and position."""

    weights_path: Path
    state_path: Path
    weights: dict[str, torch.Tensor]
    state: dict[str, Any]

    @property
    def position(self) -> str:
        return _position(self.state)


def _read_weights(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]] | None:
    try:
        return load_safetensors(path)
    except UnreadableFileError:
        return None


# The training state's entries and their types; a state file edited by hand is checked against them.
_STATE_TYPES: dict[str, tuple[type, ...]] = {
    "model": (str,), "epoch": (int,), "batch": (int,), "step": (int,), "epoch_loss": (list, tuple),
    "batch_size": (int,), "world_size": (int,), "grad_accum_steps": (int,), "optimizer": (dict,),
    "scheduler": (dict,), "schedule_args": (dict,), "rng": (list, tuple), "best_metric": (float, int, type(None)),
    "best_epoch": (int, type(None)), "ema": (dict, type(None)),
}
_COUNTS = ("epoch", "batch", "step", "batch_size", "world_size", "grad_accum_steps")


def state_problem(state: Any) -> str | None:
    """Why ``state`` is no training state of this trainer (None when it is one): its format, missing entries, wrong
    types or negative counts."""
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        return "not a training-state file of this trainer"
    missing = [key for key in _STATE_TYPES if key not in state]
    if missing:
        return f"the training state lacks {', '.join(missing)}"
    wrong = [f"{key} ({type(state[key]).__name__})" for key, types in _STATE_TYPES.items()
             if not isinstance(state[key], types) or (isinstance(state[key], bool) and bool not in types)]
    if wrong:
        return f"the training state has entries of the wrong type: {', '.join(wrong)}"
    negative = [key for key in _COUNTS if state[key] < 0]
    if negative or not (state["batch_size"] and state["world_size"] and state["grad_accum_steps"]):
        return f"the training state has impossible counts ({', '.join(negative) or 'a zero batch size'})"
    if len(state["epoch_loss"]) != 2:
        return "the training state's epoch_loss is not [sum, count]"
    return None


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = load_torch_file(path)
    except UnreadableFileError:
        return None
    return None if state_problem(state) else state


def _pair_key(metadata_or_state: Mapping[str, Any]) -> str | None:
    # The commit id; checkpoints written before commit ids existed pair by position.
    commit = metadata_or_state.get("commit")
    if commit:
        return f"commit:{commit}"
    if "position" in metadata_or_state:
        return f"position:{metadata_or_state['position']}"
    if "epoch" in metadata_or_state:
        return f"position:{_position(metadata_or_state)}"
    return None


def find_checkpoint(directory: Path, name: str = "last") -> TrainingCheckpoint | None:
    """The newest complete checkpoint ``name`` in ``directory``, or None when none was ever published there.

    Raises :class:`TrainError` when published files exist but no complete pair can be formed (a truncated or
    corrupt file, or weights without their training state); the message names the files.
    """
    weights, state, weights_tmp, state_tmp = checkpoint_files(directory, name)
    read_weights = {p: _read_weights(p) for p in (weights, weights_tmp) if p.exists()}
    read_states = {p: _read_state(p) for p in (state, state_tmp) if p.exists()}
    pairs: list[TrainingCheckpoint] = []
    for wpath, wread in read_weights.items():
        if wread is None or _pair_key(wread[1]) is None:
            continue
        for spath, sread in read_states.items():
            if sread is not None and _pair_key(sread) == _pair_key(wread[1]):
                pairs.append(TrainingCheckpoint(wpath, spath, wread[0], sread))
    if pairs:
        return max(pairs, key=lambda c: _position_key(c.position))
    if not weights.exists() and not state.exists():
        return None  # nothing published yet: at most the partial files of a first commit cut short
    unreadable = [p for p, r in [*read_weights.items(), *read_states.items()] if r is None]
    if unreadable:
        reasons = []
        for path in unreadable:
            try:
                loaded = (load_safetensors if path.suffix == ".safetensors" else load_torch_file)(path)
                reasons.append(f"{path}: {state_problem(loaded)}")
            except UnreadableFileError as e:
                reasons.append(str(e))
        raise TrainError(f"no complete checkpoint in {directory}: {'; '.join(reasons)}")
    if not weights.exists():
        raise TrainError(f"{weights} is missing: cannot resume from {state}")
    position = read_weights[weights][1].get("position") if read_weights.get(weights) else None
    raise TrainError(f"{weights} (position {position}) has no matching training state next to it in {directory}")


def settle(checkpoint: TrainingCheckpoint, directory: Path, name: str = "last") -> None:
    """Publish ``checkpoint`` under the usual names if a kill left it in ``.tmp`` files, and remove stale ``.tmp``
    files: the end of an interrupted commit (its steps 3 and 4), safe to cut short and repeat."""
    weights, state, weights_tmp, state_tmp = checkpoint_files(directory, name)
    if checkpoint.weights_path == weights_tmp:
        publish(weights_tmp, weights)
    if checkpoint.state_path == state_tmp:
        publish(state_tmp, state)
    for tmp in (weights_tmp, state_tmp):
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)


def resolve_resume(path: str) -> Path:
    """The training-state file that ``--resume PATH`` names: a run directory, NAME.state.pt or NAME.safetensors.

    Neither need exist: a run killed before its first checkpoint has none yet, and one killed in its first seconds
    not even its directory (``PATH`` is then taken for the run directory, unless it names a checkpoint file).
    """
    candidate = Path(path)
    if candidate.is_dir() or not (candidate.exists() or candidate.name.endswith((_STATE_SUFFIX, ".safetensors"))):
        candidate = candidate / ("last" + _STATE_SUFFIX)
    elif candidate.suffix == ".safetensors":
        candidate = candidate.with_name(candidate.stem + _STATE_SUFFIX)
    if not candidate.name.endswith(_STATE_SUFFIX):
        raise TrainError(f"--resume {path}: expected a run directory or a checkpoint (last.state.pt, last.safetensors)")
    if candidate.parent.exists() and not candidate.parent.is_dir():
        raise TrainError(f"--resume {path}: {candidate.parent} is not a directory")
    return candidate


def load_training_checkpoint(state_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model weights and training state of the newest complete training checkpoint that ``state_path`` names (for
    model files alone, :func:`effidense.weights.load_checkpoint`)."""
    name = state_path.name[: -len(_STATE_SUFFIX)]
    checkpoint = find_checkpoint(state_path.parent, name)
    if checkpoint is None:
        raise TrainError(f"{state_path} does not exist")
    return checkpoint.weights, checkpoint.state


def rng_state() -> dict[str, Any]:
    """This process's RNG states (torch CPU and CUDA, Python, numpy) as weights_only-loadable values."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "python": random.getstate(),
        "numpy": (name, torch.from_numpy(keys.astype(np.int64)), int(pos), int(has_gauss), float(cached)),
    }


def set_rng_state(state: Mapping[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    random.setstate(state["python"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
