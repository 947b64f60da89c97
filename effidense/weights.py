"""Checkpoint keys and files: the one key-mapping table, the safe state-dict reader and writer, timm's filter.

Modern torchvision, timm and effidense state dicts use the same keys (``features.conv0.weight``,
``features.denseblock1.denselayer1.norm1.weight``, ``features.transition1.conv.weight``, ``features.norm5.*``,
``classifier.*``); MONAI's DenseNet nests each dense layer's modules under ``layers.`` and names its classifier
``class_layers.out``. :data:`KEY_RULES` is the one table of what does differ; :func:`canonical_state_dict` applies it,
:func:`layout_state_dict` writes a layout's own names, and :func:`timm_pretrained_filter` is timm's
``pretrained_filter_fn`` built on it. :func:`load_checkpoint` reads
``.pth``/``.pt``/``.bin`` (``torch.load(weights_only=True)``; training checkpoints wrapped as ``{'state_dict': ...}``
or ``{'model': ...}`` too) and ``.safetensors``; :func:`save_checkpoint` writes either, atomically. Every failure
raises :class:`ConversionError` with a one-line message. The model (:mod:`effidense.registry`) and the converter
(:mod:`effidense.convert`) both import this module; it imports neither.
"""
from __future__ import annotations

import argparse
import os
import re
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn

from .fileio import (
    UnreadableFileError,
    atomic_write,
    check_writable,
    content_format,
    load_safetensors,
    load_torch_file,
    save_torch_file,
    write_failure,
)

__all__ = ["KEY_RULES", "PTH_SUFFIXES", "Checkpoint", "ConversionError", "KeyRule", "VerificationError",
           "canonical_key", "canonical_state_dict", "complete_state_dict", "describe_misfit", "has_layout_keys",
           "is_activation_key",
           "layout_key", "layout_state_dict", "load_checkpoint", "save_checkpoint", "timm_pretrained_filter",
           "values_problem"]


PTH_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt", ".tar")
_SHOWN = 20  # keys listed per category in an error message; the exception holds them all


class KeyRule(NamedTuple):
    """One row of :data:`KEY_RULES`: ``pattern`` -> ``replacement`` turns a checkpoint key into effidense's name.
    A rule with a ``layout`` describes that layout's own names, and ``write_pattern`` -> ``write_replacement`` turns
    effidense's name back into them (:func:`layout_state_dict`); rules without one are only ever read."""

    what: str
    pattern: re.Pattern[str]
    replacement: str
    layout: str | None = None
    write_pattern: re.Pattern[str] | None = None
    write_replacement: str = ""


# The one key-mapping table. Each rule rewrites checkpoint keys into effidense's (= modern torchvision/timm) names
# and applies to every source, since none of the patterns can match a key that is already canonical; the rules run
# in order on each key. Writing torchvision, timm or effidense needs no rules (their keys are effidense's); writing
# MONAI applies the write side of the MONAI rows. MONAI's own fix-up of the legacy hub files (a regex in its
# densenet._load_state_dict: 'denselayer1.norm.1.weight' -> 'denselayer1.layers.norm1.weight') is the legacy row
# read and the MONAI dense-layer row written.
KEY_RULES: tuple[KeyRule, ...] = (
    KeyRule("DataParallel/DDP 'module.' or torch.compile '_orig_mod.' prefix",
            re.compile(r"^(?:module\.|_orig_mod\.)+"), ""),
    KeyRule("MONAI dense-layer name ('denselayer1.layers.norm1.weight')",
            re.compile(r"^(.*\.denselayer\d+\.)layers\."), r"\1",
            "monai", re.compile(r"^(.*\.denselayer\d+\.)"), r"\1layers."),
    KeyRule("legacy torchvision name (densenet121-a639ec97.pth era: 'denselayer1.norm.1.weight')",
            re.compile(r"^(.*\.denselayer\d+\.)(norm|relu|conv)\.([12])\.(weight|bias|running_mean|running_var)$"),
            r"\1\2\3.\4"),
    KeyRule("MONAI classifier name ('class_layers.out.weight')",
            re.compile(r"^class_layers\.out\."), "classifier.",
            "monai", re.compile(r"^classifier\."), "class_layers.out."),
)
_LEGACY_RULE = KEY_RULES[2].pattern
_WRAPPER_KEYS = ("state_dict", "model", "model_state_dict")
_EMA_KEYS = ("state_dict_ema", "model_ema")


class ConversionError(ValueError):
    """A checkpoint cannot be read, understood, converted or written; the message is one line naming the problem.

    ``unknown``, ``missing`` and ``mismatched`` hold every offending key when the weights do not fit an architecture
    (``mismatched`` as ``(key, shape in file, expected shape)``).
    """

    def __init__(self, message: str, *, unknown: Iterable[str] = (), missing: Iterable[str] = (),
                 mismatched: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]] = ()) -> None:
        super().__init__(message)
        self.unknown = list(unknown)
        self.missing = list(missing)
        self.mismatched = list(mismatched)


class VerificationError(ConversionError):
    """The converted model's outputs differ from the source model's by more than the tolerance."""

    def __init__(self, message: str, max_abs_diff: float) -> None:
        super().__init__(message)
        self.max_abs_diff = max_abs_diff




# --- reading ---

@dataclass
class Checkpoint:
    """A state dict as read from a file, with the safetensors header metadata (empty for ``.pth``)."""

    state_dict: dict[str, Tensor]
    metadata: dict[str, str] = field(default_factory=dict)
    path: str = ""
    notes: list[str] = field(default_factory=list)


def _torch_load(path: Path) -> Any:
    # timm's training checkpoints store their argparse.Namespace of settings; it holds no code, so it is allowed.
    try:
        with warnings.catch_warnings():
            # torch warns about sparse tensors while loading (torch >= 2.14 that it validates them, 2.11 that it does
            # not); they are refused right after, in one line of our own
            warnings.filterwarnings("ignore", message="Validating sparse tensor invariants")
            warnings.filterwarnings("ignore", message="Sparse invariant checks are implicitly disabled")
            return load_torch_file(path, safe_globals=[argparse.Namespace])
    except UnreadableFileError as e:
        raise ConversionError(str(e)) from None


def _safetensors_load(path: Path) -> tuple[dict[str, Tensor], dict[str, str]]:
    try:
        return load_safetensors(path)
    except UnreadableFileError as e:
        raise ConversionError(str(e)) from None


def _unwrap(obj: Any, path: Path, use_ema: bool) -> tuple[dict[str, Any], list[str]]:
    """The state dict inside a training checkpoint (``{'state_dict': ...}``, ``{'model': ...}``, EMA weights)."""
    if not isinstance(obj, Mapping):
        raise ConversionError(f"{path}: holds a {type(obj).__name__}, not a state dict")
    notes = []
    if use_ema:
        key = next((k for k in _EMA_KEYS if isinstance(obj.get(k), Mapping)), None)
        if key is None:
            raise ConversionError(f"{path}: no EMA weights ({' or '.join(_EMA_KEYS)}) in this checkpoint; "
                                  f"its top-level keys: {listing(map(str, obj))}")
        return dict(obj[key]), [f"took the EMA weights under {key!r}"]
    if obj and all(isinstance(v, Tensor) for v in obj.values()):
        return dict(obj), notes
    key = next((k for k in _WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
    if key is None:
        if not obj:
            raise ConversionError(f"{path}: the checkpoint is empty")
        raise ConversionError(f"{path}: no state dict found: top-level keys are {listing(map(str, obj))} "
                              f"(expected tensors, or one of {', '.join(_WRAPPER_KEYS)})")
    notes.append(f"took the weights under {key!r}")
    if any(isinstance(obj.get(k), Mapping) for k in _EMA_KEYS):
        notes.append("the file also holds EMA weights; pass use_ema=True (--ema) to convert those")
    return dict(obj[key]), notes


def _fold_pruning(state_dict: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """``torch.nn.utils.prune``'s ``<name>_orig`` and ``<name>_mask`` pairs folded into ``<name>``, their product, as
    ``prune.remove`` leaves it; and a note, where any were."""
    pruned = {k[:-5] for k in state_dict if k.endswith("_orig") and k[:-5] not in state_dict and
              isinstance(state_dict.get(f"{k[:-5]}_mask"), Tensor) and isinstance(state_dict[k], Tensor)}
    if not pruned:
        return state_dict, []
    folded = {}
    for key, value in state_dict.items():
        name = key[:-5]
        if name in pruned and key.endswith("_orig"):
            folded[name] = value * state_dict[f"{name}_mask"].to(value.dtype)
        elif not (key.endswith("_mask") and key[:-5] in pruned):
            folded[key] = value
    return folded, [f"folded the pruning masks of {len(pruned)} weights into them (as torch.nn.utils.prune.remove "
                    "does)"]


def load_checkpoint(path: str | os.PathLike[str], use_ema: bool = False) -> Checkpoint:
    """Read a state dict from a ``.safetensors`` or torch (``.pth``/``.pt``/``.bin``) file, safely.

    The format is recognised from the content, not the name. Training checkpoints are unwrapped (``state_dict``,
    ``model``, ``model_state_dict``; with ``use_ema`` the EMA weights), and pruned weights folded (``weight_orig`` times
    ``weight_mask``). Keys are returned as stored; values that no trained model has (:func:`values_problem`: NaN/inf,
    integer or bool weights, negative running variances) are refused.
    """
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"checkpoint not found: {path}" if not path.exists() else f"not a file: {path}")
    if path.stat().st_size == 0:
        raise ConversionError(f"{path}: the file is empty")
    found = content_format(path)
    if found is None:
        raise ConversionError(f"{path}: corrupt or truncated checkpoint (neither a PyTorch nor a safetensors file)")
    notes = []
    named = _FORMAT_NAMES.get(_suffix_format(path))
    if named is not None and named != _FORMAT_NAMES[found]:
        notes.append(f"{path.name} is a {_FORMAT_NAMES[found]}, not a {named}; read as one")
    if found == "safetensors":
        tensors, metadata = _safetensors_load(path)
        state_dict, more = _unwrap(tensors, path, use_ema) if tensors else ({}, [])
        if not state_dict:
            raise ConversionError(f"{path}: the safetensors file holds no tensors")
    else:
        (state_dict, more), metadata = _unwrap(_torch_load(path), path, use_ema), {}
    # refused here, on load, so that no reader (convert, the trainer) takes values that no trained model has
    problem = state_dict_problem(state_dict)
    if problem is None:
        state_dict, folded = _fold_pruning(state_dict)
        more += folded
        problem = values_problem(state_dict)
    if problem:
        raise ConversionError(f"{path}: {problem}")
    return Checkpoint(state_dict, metadata, str(path), notes + more)


_FORMAT_NAMES = {"safetensors": "safetensors file", "torch": "PyTorch checkpoint"}


def _suffix_format(path: Path) -> str | None:
    suffix = path.suffix.lower()
    return "safetensors" if suffix == ".safetensors" else "torch" if suffix in PTH_SUFFIXES else None


# --- keys and shapes ---

def state_dict_problem(state_dict: Mapping[Any, Any]) -> str | None:
    """Why ``state_dict`` is no state dict of plain tensors (None when it is): a pickle may hold other keys and
    values (integer keys, sparse or quantized tensors) that no DenseNet, and no safetensors file, can take."""
    not_strings = [k for k in state_dict if not isinstance(k, str)]
    if not_strings:
        return (f"not a state dict: {len(not_strings)} keys are not strings: "
                f"{listing(repr(k) for k in not_strings)}")
    not_tensors = [k for k, v in state_dict.items() if not isinstance(v, Tensor)]
    if not_tensors:
        return f"not a state dict: {len(not_tensors)} entries are not tensors: {listing(not_tensors)}"
    not_dense = [f"{k} ({'quantized' if v.is_quantized else v.layout})" for k, v in state_dict.items()
                 if v.layout != torch.strided or v.is_quantized]
    if not_dense:
        return f"{len(not_dense)} tensors are not dense (strided) tensors: {listing(not_dense)}"
    return None


# The tensors of torch's convolutions, linear layers and norms, which are floating point in every model.
_FLOAT_NAMES = frozenset({"weight", "bias", "running_mean", "running_var"})


def values_problem(state_dict: Mapping[str, Tensor]) -> str | None:
    """Why the values of ``state_dict`` can be no trained model's (None when they can be): a floating-point tensor
    holding NaN/inf, a BatchNorm ``running_var`` below zero (its square root would be NaN), or a weight, bias or
    running statistic that is not floating point (a model's integer buffers, such as BatchNorm's
    ``num_batches_tracked``, have other names)."""
    not_float = [f"{k} ({str(v.dtype).removeprefix('torch.')})" for k, v in state_dict.items()
                 if not v.is_floating_point() and k.rsplit(".", 1)[-1] in _FLOAT_NAMES]
    if not_float:
        return (f"{len(not_float)} tensor(s) are not floating point, so they are no weights: {listing(not_float)}")
    non_finite = [k for k, v in state_dict.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if non_finite:
        return f"{len(non_finite)} tensor(s) hold NaN/inf values: {listing(non_finite)}"
    negative = [k for k, v in state_dict.items() if k.endswith("running_var") and bool((v < 0).any())]
    if negative:
        return (f"{len(negative)} BatchNorm running_var tensor(s) hold negative variances (the model would output "
                f"NaN): {listing(negative)}")
    return None


def listing(keys: Iterable[str]) -> str:
    keys = list(keys)
    shown = ", ".join(keys[:_SHOWN])
    return shown + (f" (+{len(keys) - _SHOWN} more)" if len(keys) > _SHOWN else "")


def describe_misfit(unknown: Iterable[str], missing: Iterable[str],
                    mismatched: Iterable[tuple[str, tuple[int, ...], tuple[int, ...]]]) -> str:
    """Weights that do not fit a model, in one line: '2 mis-shaped: k [a] (expected [b]), ...; 1 missing: ...;
    1 unknown: ...' (empty categories left out; :data:`_SHOWN` keys listed per category)."""
    unknown, missing, mismatched = list(unknown), list(missing), list(mismatched)
    parts = []
    if mismatched:
        parts.append(f"{len(mismatched)} mis-shaped: " + listing(
            f"{k} {list(got)} (expected {list(want)})" for k, got, want in mismatched))
    if missing:
        parts.append(f"{len(missing)} missing: {listing(missing)}")
    if unknown:
        parts.append(f"{len(unknown)} unknown: {listing(unknown)}")
    return "; ".join(parts)


def canonical_state_dict(state_dict: Mapping[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """Apply :data:`KEY_RULES`: keys in effidense's (= modern torchvision/timm) names, and notes on what changed."""
    problem = state_dict_problem(state_dict)
    if problem:
        raise ConversionError(problem)
    out: dict[str, Any] = {}
    counts = [0] * len(KEY_RULES)
    origin: dict[str, str] = {}
    for key, value in state_dict.items():
        new = key
        for i, rule in enumerate(KEY_RULES):
            new, n = rule.pattern.subn(rule.replacement, new)
            counts[i] += n
        if new in out:
            raise ConversionError(f"keys {origin[new]!r} and {key!r} both mean {new!r}")
        out[new], origin[new] = value, key
    notes = [f"renamed {n} keys: {rule.what}" for rule, n in zip(KEY_RULES, counts, strict=True) if n]
    return out, notes


def canonical_key(key: str) -> str:
    """One checkpoint key in effidense's names (what :func:`canonical_state_dict` makes of it)."""
    for rule in KEY_RULES:
        key = rule.pattern.sub(rule.replacement, key)
    return key


def _layout_rules(layout: str) -> list[KeyRule]:
    return [rule for rule in KEY_RULES if rule.layout == layout and rule.write_pattern is not None]


def layout_key(key: str, layout: str) -> str:
    """An effidense (canonical) key in ``layout``'s own names (unchanged for torchvision, timm and effidense)."""
    for rule in _layout_rules(layout):
        key = rule.write_pattern.sub(rule.write_replacement, key)
    return key


def layout_state_dict(state_dict: Mapping[str, Any], layout: str) -> dict[str, Any]:
    """A canonical state dict with its keys in ``layout``'s own names (same tensors, same order)."""
    return {layout_key(key, layout): value for key, value in state_dict.items()}


def has_layout_keys(state_dict: Mapping[str, Any], layout: str) -> bool:
    """Whether some key is in a name only ``layout`` uses (e.g. MONAI's 'denselayer1.layers.norm1.weight')."""
    patterns = [rule.pattern for rule in KEY_RULES if rule.layout == layout]
    return any(pattern.search(key) for key in state_dict for pattern in patterns)


def has_legacy_keys(state_dict: Mapping[str, Any]) -> bool:
    return any(_LEGACY_RULE.search(key) for key in state_dict)


def is_bn_counter(key: str) -> bool:
    return key.endswith(".num_batches_tracked")


def is_activation_key(key: str) -> bool:
    """Whether ``key`` is an activation module's parameter (a PReLU's weight): torchvision's and MONAI's names for a
    norm's activation are ``relu0``, ``relu1``, ``relu2``, ``relu``, whatever it computes."""
    parts = key.split(".")
    return len(parts) > 1 and parts[-2].startswith("relu")


def complete_state_dict(state_dict: Mapping[str, Tensor],
                        keys: Iterable[str]) -> tuple[dict[str, Tensor], list[str]]:
    """The state dict in a model's key order (``keys``, all of which the caller has checked are present but BatchNorm
    counters), with absent BatchNorm counters set to 0 and no shared storage (safetensors refuses tensors that share
    memory); and a note on the counters it set."""
    out: dict[str, Tensor] = {}
    filled = 0
    seen: set[tuple[str, int]] = set()
    for key in keys:
        if key not in state_dict:
            out[key] = torch.zeros((), dtype=torch.long)
            filled += 1
            continue
        tensor = state_dict[key].detach()
        storage = (str(tensor.device), tensor.untyped_storage().data_ptr())
        tensor = tensor.clone() if storage in seen else tensor.contiguous()
        seen.add(storage)
        out[key] = tensor
    notes = [f"set {filled} missing BatchNorm num_batches_tracked counters to 0"] if filled else []
    return out, notes


def timm_pretrained_filter(state_dict: Mapping[str, Tensor], model: nn.Module) -> dict[str, Tensor]:
    """timm's ``pretrained_filter_fn`` for the ``effi_*`` models: apply :data:`KEY_RULES`, refuse values no trained
    model has (:func:`values_problem`, naming the file or hub repository) and fill BatchNorm counters old checkpoints
    lack. Shape problems are left to timm's (strict or not) ``load_state_dict``."""
    canonical, _ = canonical_state_dict(state_dict)
    problem = values_problem(canonical)
    if problem:  # the hub's weights and a pretrained_cfg file come here, and through no other check
        cfg = getattr(model, "pretrained_cfg", None) or {}
        source = cfg.get("file") or cfg.get("hf_hub_id") or cfg.get("url") or "the pretrained weights"
        raise ConversionError(f"{source}: {problem}")
    for key, value in model.state_dict().items():
        if is_bn_counter(key) and key not in canonical and key.rsplit(".", 1)[0] + ".weight" in canonical:
            canonical[key] = torch.zeros_like(value, device="cpu")
    return canonical


# --- writing ---

def output_format(path: Path, fmt: str | None) -> str:
    suffix = path.suffix.lower()
    implied = "safetensors" if suffix == ".safetensors" else "pth" if suffix in PTH_SUFFIXES else None
    if fmt is None:
        return implied or "safetensors"
    if fmt not in ("safetensors", "pth"):
        raise ConversionError(f"unknown format {fmt!r}; choose safetensors or pth")
    if implied is not None and implied != fmt:
        # timm picks its reader by the suffix, so a mismatch would make the file unreadable there
        raise ConversionError(f"format {fmt} contradicts the output name {path.name}; use a "
                              f"{'.safetensors' if fmt == 'safetensors' else '.pth'} name")
    return fmt


def check_output(path: Path, force: bool) -> None:
    """:func:`effidense.fileio.check_writable` (the one output check) as a :class:`ConversionError`: before any
    work, not after it."""
    reason = check_writable([path], force=force)
    if reason:
        raise ConversionError(reason)


def save_checkpoint(
        state_dict: Mapping[str, Tensor],
        path: str | os.PathLike[str],
        fmt: str | None = None,
        metadata: Mapping[str, str] | None = None,
        force: bool = False,
        check: Callable[[Path], None] | None = None,
) -> Path:
    """Write ``state_dict`` atomically as ``.safetensors`` (with ``metadata`` in the header) or a ``.pth`` state dict.

    ``fmt`` defaults to what the suffix says (safetensors when it says nothing). The file appears only when
    complete, and after ``check(temporary_path)`` passes; an existing file is kept unless ``force``. Only what
    :func:`load_checkpoint` reads is written: tensors whose values a trained model can have (:func:`values_problem`).
    """
    path = Path(path)
    fmt = output_format(path, fmt)
    check_output(path, force)
    problem = state_dict_problem(state_dict) or values_problem(state_dict)
    if problem:
        raise ConversionError(f"cannot write {path}: {problem}")
    tensors = {key: value.detach().contiguous() for key, value in state_dict.items()}

    from safetensors import SafetensorError

    def write(tmp: str) -> None:
        try:
            if fmt == "safetensors":
                from safetensors.torch import save_file

                save_file(tensors, tmp, metadata=dict(metadata or {}))
            else:
                save_torch_file(tensors, tmp)
        except (SafetensorError, RuntimeError) as e:
            # both serialisers report a failed write (a full disk) in their own types; atomic_write then cleans up
            raise OSError(write_failure(e)) from None
        if check is not None:
            check(Path(tmp))

    try:
        atomic_write(path, write)
    except OSError as e:
        # the system's reason alone: the message should name the output, not the temporary file beside it
        raise ConversionError(f"cannot write {path}: {write_failure(e)}") from None
    return path
