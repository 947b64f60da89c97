"""Checkpoints of the built-in trainer: model weights as safetensors plus a training-state file.

``NAME.safetensors`` holds the model weights (loadable by timm's ``--initial-checkpoint``/``--pretrained-path`` and
by safetensors alone); ``NAME.state.pt`` holds what a resumed run needs (optimizer, scheduler, scaler, EMA weights,
epoch, batch, step, RNG states, best metric) as plain tensors and Python values, so it loads with
``torch.load(weights_only=True)``. Each file is written to ``FILE.tmp`` and moved into place with ``os.replace``.
Both record the same (epoch, batch, step) position; the weights are replaced first, so if a kill lands between the
two replacements the complete ``NAME.state.pt.tmp`` still pairs with the new weights and is used instead.
"""
from __future__ import annotations

import os
import random
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import TrainError

__all__ = ["STATE_FORMAT", "atomic_write", "save_weights", "save_checkpoint", "resolve_resume", "load_checkpoint",
           "rng_state", "set_rng_state", "weights_path_for"]

STATE_FORMAT = "effidense-train-state/1"
_STATE_SUFFIX = ".state.pt"


def atomic_write(path: Path, write: Callable[[str], None]) -> None:
    """``write(tmp)`` to ``path.tmp`` in the same directory, then move it over ``path`` in one step."""
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    os.replace(tmp, path)


def _position(state: Mapping[str, Any]) -> str:
    return f"{state['epoch']}/{state['batch']}/{state['step']}"


def save_weights(path: Path, state_dict: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None) -> None:
    """Write a state dict as safetensors, atomically."""
    tensors = {key: value.detach().to("cpu").contiguous() for key, value in state_dict.items()}

    def write(tmp: str) -> None:
        save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
        os.chmod(tmp, 0o666 & ~_umask())  # safetensors creates owner-only files; give the usual permissions

    atomic_write(path, write)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def weights_path_for(state_path: Path) -> Path:
    return state_path.with_name(state_path.name[: -len(_STATE_SUFFIX)] + ".safetensors")


def save_checkpoint(directory: Path, name: str, model_state: Mapping[str, torch.Tensor],
                    train_state: dict[str, Any]) -> Path:
    """Write ``NAME.safetensors`` and ``NAME.state.pt`` in ``directory``; returns the state file's path."""
    train_state = {"format": STATE_FORMAT, **train_state}
    state_path = directory / (name + _STATE_SUFFIX)
    save_weights(weights_path_for(state_path), model_state,
                 {"position": _position(train_state), "model": str(train_state.get("model", ""))})
    atomic_write(state_path, lambda tmp: torch.save(train_state, tmp))
    return state_path


def resolve_resume(path: str) -> Path:
    """The training-state file that ``--resume PATH`` names: a run directory, NAME.state.pt or NAME.safetensors."""
    candidate = Path(path)
    if candidate.is_dir():
        candidate = candidate / ("last" + _STATE_SUFFIX)
    elif candidate.suffix == ".safetensors":
        candidate = candidate.with_name(candidate.stem + _STATE_SUFFIX)
    if not candidate.name.endswith(_STATE_SUFFIX):
        raise TrainError(f"--resume {path}: expected a run directory or a checkpoint (last.state.pt, last.safetensors)")
    if not candidate.is_file() and not candidate.with_name(candidate.name + ".tmp").is_file():
        raise TrainError(f"--resume {path}: {candidate} does not exist")
    return candidate


def _load_state(path: Path) -> dict[str, Any] | None:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        return None
    except Exception:  # a .tmp file cut short by a kill
        if path.name.endswith(".tmp"):
            return None
        raise
    return state if isinstance(state, dict) and state.get("format") == STATE_FORMAT else None


def load_checkpoint(state_path: Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Model weights and training state of a checkpoint, checked to belong together."""
    weights_path = weights_path_for(state_path)
    if not weights_path.is_file():
        raise TrainError(f"{weights_path} is missing: cannot resume from {state_path}")
    with safe_open(str(weights_path), framework="pt") as f:
        position = (f.metadata() or {}).get("position")
    for candidate in (state_path, state_path.with_name(state_path.name + ".tmp")):
        try:
            state = _load_state(candidate)
        except Exception as e:
            raise TrainError(f"{candidate}: not a readable training-state file ({e})") from e
        if state is not None and _position(state) == position:
            return load_file(str(weights_path)), state
    raise TrainError(f"{weights_path} (position {position}) has no matching training state next to it in {state_path}")


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
