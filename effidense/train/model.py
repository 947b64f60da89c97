"""The model a training run starts from: timm's ``create_model`` with the trainer's model flags, weights files read
by effidense's safe loader and checked to fit, and an input size the model can take.

``--initial-checkpoint`` loads strictly. ``--pretrained-path`` is loaded as timm's ``train.py`` loads it (a new
classifier, input channels adapted), and then checked: timm loads such weights non-strictly, so a file of other keys
would otherwise train from random weights with no more than a logged warning.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
from typing import Any

import timm
import torch
from torch import nn

from .. import registry  # noqa: F401 (the trainer creates effi_* models through timm)
from ..fileio import short_error
from ..weights import (
    ConversionError,
    canonical_state_dict,
    describe_misfit,
    is_bn_counter,
    load_checkpoint,
)
from .errors import TrainError

__all__ = ["build_model", "read_weights_file", "check_input_size"]


def check_input_size(model: nn.Module, input_size: tuple[int, ...], args: argparse.Namespace) -> None:
    """Refuse an input size the model cannot take before any training: its ``min_input_size``, or else (for a size
    other than its default) one evaluation forward of a single zero image."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    minimum = cfg.get("min_input_size")
    if minimum is not None and any(s < m for s, m in zip(input_size[1:], minimum[1:], strict=False)):
        raise TrainError(f"--img-size {input_size[-1]}: {args.model} needs at least {minimum[-1]} pixels "
                         f"(min_input_size {tuple(minimum)})")
    if tuple(input_size) == tuple(cfg.get("input_size", ())):
        return
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(torch.zeros(1, *input_size))
    except (ValueError, RuntimeError) as e:
        size = "x".join(map(str, input_size))
        raise TrainError(f"--img-size {input_size[-1]}: {args.model} cannot take one {size} image "
                         f"({short_error(e, 300)})") from None
    finally:
        model.train(was_training)


def read_weights_file(flag: str, path: str) -> dict[str, torch.Tensor]:
    """The state dict in ``path`` (``--initial-checkpoint``/``--pretrained-path``), read by effidense's safe loader
    (safetensors, or ``torch.load(weights_only=True)``) whatever timm's version; keys in timm's names, values a trained
    model can hold (``load_checkpoint`` checks them). Anything else is a :class:`TrainError` naming ``flag``
    and the file."""
    try:
        state_dict, _ = canonical_state_dict(load_checkpoint(path).state_dict)
    except ConversionError as e:
        raise TrainError(f"{flag} {path}: {e}") from None
    return state_dict


def _names(cfg_value: str | tuple[str, ...] | list[str] | None) -> tuple[str, ...]:
    if not cfg_value:
        return ()
    return (cfg_value,) if isinstance(cfg_value, str) else tuple(cfg_value)


def _check_pretrained(model: nn.Module, weights: dict[str, torch.Tensor], args: argparse.Namespace) -> str:
    """Check that ``model`` (created by timm from ``--pretrained-path``) took every tensor of the file except the
    classifier it replaces (and the first convolution where timm adapted its input channels); returns one line
    saying what was loaded. timm loads such weights non-strictly, so a file of other keys would train from random
    weights with no more than a logged warning."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    head = tuple(f"{name}." for name in _names(cfg.get("classifier")))
    first_convs = {f"{name}.weight" for name in _names(cfg.get("first_conv"))}
    own = model.state_dict()
    body = {key: value for key, value in weights.items() if not key.startswith(head)}
    unknown = [key for key in body if key not in own]
    missing = [key for key in own if key not in body and not key.startswith(head) and not is_bn_counter(key)]
    mismatched, adapted = [], []
    for key, value in body.items():
        if key not in own:
            continue
        target = own[key]
        if value.shape != target.shape:
            if key in first_convs and value.shape[:1] + value.shape[2:] == target.shape[:1] + target.shape[2:]:
                adapted.append(f"{key} from {value.shape[1]} to {target.shape[1]} input channels")
            else:
                mismatched.append((key, tuple(value.shape), tuple(target.shape)))
        elif not torch.equal(target.detach().cpu(), value.to(target.dtype)):
            missing.append(key)  # present in the file, yet not what the model holds: not loaded
    if unknown or missing or mismatched:
        raise TrainError(f"--pretrained-path {args.pretrained_path}: the weights do not fit {args.model} beyond "
                         f"the classifier it replaces ({describe_misfit(unknown, missing, mismatched)}); check the "
                         "file and --model/--model-kwargs, or convert the file with `effidense convert`")
    heads = [key for key in own if key.startswith(head)]
    return (f"--pretrained-path {args.pretrained_path}: loaded {len(body) - len(adapted)} tensors into {args.model}"
            + (f"; adapted {', '.join(adapted)}" if adapted else "")
            + (f"; {', '.join(heads)} initialised afresh (the classifier, as timm replaces it)" if heads else ""))


def build_model(args: argparse.Namespace, num_classes: int, notes: list[str] | None = None) -> nn.Module:
    """``timm.create_model`` with the trainer's model flags applied (weights files, memory mode, grad checkpointing,
    SyncBN). Weights files are read by :func:`read_weights_file`, never by timm's loaders; ``--pretrained-path``
    must fit the model beyond its classifier, and what it loaded is appended to ``notes``."""
    initial = read_weights_file("--initial-checkpoint", args.initial_checkpoint) if args.initial_checkpoint else None
    pretrained = read_weights_file("--pretrained-path", args.pretrained_path) if args.pretrained_path else None
    # as timm's train.py: the file's weights, with a new classifier (num_classes=-1 forces the adaptation)
    overlay = dict(state_dict=pretrained, num_classes=-1) if pretrained is not None else None
    try:
        with _quiet_timm_loader(pretrained is not None):
            model = timm.create_model(
                args.model, pretrained=args.pretrained or pretrained is not None, num_classes=num_classes,
                drop_rate=args.drop, pretrained_cfg_overlay=overlay, **args.model_kwargs,
                **{key: getattr(args, key, None) for key in ("bn_momentum", "bn_eps")
                   if getattr(args, key, None) is not None})
    except (RuntimeError, ValueError, TypeError, KeyError, FileNotFoundError) as e:
        hint = ("; pretrained effi_* weights come from the Hugging Face Hub (timm/densenet*); offline, put them in the "
                "hub cache or pass --pretrained-path FILE") if args.pretrained and not args.pretrained_path else ""
        raise TrainError(f"cannot create model {args.model!r}: {short_error(e, 300)}{hint}") from e
    if pretrained is not None:
        note = _check_pretrained(model, pretrained, args)
        if notes is not None:
            notes.append(note)
    if initial is not None:
        try:
            model.load_state_dict(initial)
        except RuntimeError as e:
            raise TrainError(f"--initial-checkpoint {args.initial_checkpoint}: the weights do not fit {args.model} "
                             f"({short_error(e, 300)})") from None
    if args.memory is not None or args.grad_checkpointing:
        if args.memory is not None and not hasattr(model, "set_memory"):
            raise TrainError(f"--memory applies to effidense models; {args.model} has no memory modes")
        if args.memory == "plain" and args.grad_checkpointing:
            raise TrainError("--memory plain contradicts --grad-checkpointing; pass only one of them")
        if args.grad_checkpointing:
            model.set_grad_checkpointing(True)
        if args.memory is not None:
            model.set_memory(args.memory)
    return model


@contextlib.contextmanager
def _quiet_timm_loader(quiet: bool) -> Any:
    """Hold back timm's log of the keys a non-strict load skipped: :func:`_check_pretrained` reports them instead, as
    an error."""
    logger = logging.getLogger("timm.models")
    level = logger.level
    if quiet:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)
