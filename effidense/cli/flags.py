"""The commands' shared flags and argparse types: ``--model`` and the custom-config flags that describe a
:class:`~effidense.modelspec.ModelSpec` (:func:`add_model_arguments`, :func:`spec_from_args`), timm's
``--model-kwargs``, a parser whose errors are one line, and the numeric types (counts, seeds, threads). Torch-free
until a spec is resolved: the commands build their parsers from it and answer ``--help`` before importing torch."""
from __future__ import annotations

import argparse
import ast
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

from ..configs import model_names

if TYPE_CHECKING:
    from ..harness.segmentation import SegmentationSpec
    from ..modelspec import ModelSpec

__all__ = ["add_model_arguments", "spec_from_args", "segmentation_spec_from_args", "ModelKwargs", "OneLineParser",
           "positive_int", "non_negative_int", "integer_in", "float_list", "seed", "thread_count", "max_threads",
           "SEED_RANGE", "primary", "report_once"]

# Seconds a rank other than torchrun's rank 0 leaves an error to rank 0 before it prints the error itself.
RANK_WAIT_S = 60.0


def primary() -> bool:
    """Whether this is torchrun's rank 0, or a process outside torchrun: the one that speaks for every rank."""
    return os.environ.get("RANK", "0") == "0"


def report_once(message: str) -> None:
    """Print the run's error ``message`` on stderr, once for all of torchrun's ranks. Every rank parses the same
    arguments and reads the same files, so each meets the same error, and rank 0 (or a process outside torchrun)
    prints it. Another rank that exited at once would have torchrun end rank 0 before it printed: so another rank
    waits, for torchrun to end it once rank 0 has failed. One still waiting after :data:`RANK_WAIT_S` met an error
    rank 0 did not, and prints it."""
    if not primary():
        time.sleep(RANK_WAIT_S)
    print(message, file=sys.stderr)


def add_model_arguments(parser: argparse.ArgumentParser, default_model: str | None,
                        default_help: str | None = None) -> None:
    """``--model`` plus the custom-config flags, shared by the tools."""
    group = parser.add_argument_group("model", "a named configuration, optionally changed by the flags below")
    shown = default_help or default_model
    group.add_argument("--model", default=default_model,
                       help=f"effi_* timm name, bare config name or 'custom' (default: {shown}); "
                            f"choices: {', '.join(model_names())}")
    group.add_argument("--growth-rate", type=int, help="new feature maps per dense layer (k)")
    group.add_argument("--block-config", type=_int_list, help="layers per dense block, e.g. 6,12,24,16")
    group.add_argument("--num-init-features", type=int, help="channels after the stem")
    group.add_argument("--bn-size", type=_bn_size, help="bottleneck factor (DenseNet-BC), or 'none' for plain DenseNet")
    group.add_argument("--compression", type=float, help="fraction of channels a transition keeps")
    group.add_argument("--drop-rate", type=float, help="dropout on each dense layer's new features")
    group.add_argument("--num-classes", type=int, help="classifier outputs")
    group.add_argument("--small-inputs", action=argparse.BooleanOptionalAction, default=None,
                       help="3x3 stride-1 stem for 32x32 images (--no-small-inputs: ImageNet 7x7/2 stem + max-pool)")
    group.add_argument("--spatial-dims", type=int, choices=(1, 2, 3),
                       help="2: images (default); 3: volumes (--img-size is then the cube's edge); 1: signals")
    group.add_argument("--in-chans", type=int, help="input channels (e.g. 1 for CT or MRI volumes)")
    group.add_argument("--model-kwargs", nargs="*", action=ModelKwargs, default={}, metavar="KEY=VALUE",
                       help="DenseNet constructor arguments as timm takes them (values are Python literals, else "
                            "strings), e.g. growth_rate=12 block_config=\"(4,4)\"; the flags above take precedence")


_FLAG_ARGS = ("growth_rate", "block_config", "num_init_features", "bn_size", "compression", "drop_rate",
              "num_classes", "small_inputs", "spatial_dims", "in_chans")


def spec_from_args(args: argparse.Namespace) -> ModelSpec:
    """The spec the parsed flags of :func:`add_model_arguments` describe."""
    from ..modelspec import resolve_model  # torch: once the arguments parse, so that --help needs none

    overrides = dict(args.model_kwargs)
    for key in _FLAG_ARGS:
        value = getattr(args, key)
        if value is not None:
            overrides[key] = None if value == "none" else value
    return resolve_model(args.model, overrides)


# DenseNet flags an FC-DenseNet's architecture takes, under FCDenseNet's names; block_config, compression and
# small_inputs have no counterpart (its blocks are --model-kwargs down_blocks=... up_blocks=... bottleneck_layers=...)
_SEGMENTATION_FLAGS = {"growth_rate": "growth_rate", "num_init_features": "init_features", "bn_size": "bn_size",
                       "drop_rate": "drop_rate"}


def segmentation_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    """FCDenseNet's architecture arguments from ``--model-kwargs`` and the DenseNet flags that have a counterpart;
    the ones that have none are refused in one line."""
    unused = [f"--{key.replace('_', '-')}" for key in ("block_config", "compression", "small_inputs")
              if getattr(args, key) is not None]
    if unused:
        raise ValueError(f"{', '.join(unused)} do not apply to {args.model}; give FCDenseNet's arguments with "
                         "--model-kwargs (e.g. down_blocks=\"(2,2)\" up_blocks=\"(2,2)\" bottleneck_layers=2)")
    kwargs = dict(args.model_kwargs)
    for flag, key in _SEGMENTATION_FLAGS.items():
        value = getattr(args, flag)
        if value is not None:
            kwargs[key] = None if value == "none" else value
    return kwargs


def segmentation_spec_from_args(args: argparse.Namespace) -> SegmentationSpec:
    """The :class:`~effidense.harness.segmentation.SegmentationSpec` of ``--model fcdensenet56|67|103`` and the flags
    of :func:`add_model_arguments` (``--model-kwargs`` in FCDenseNet's names)."""
    from ..harness.segmentation import segmentation_spec  # the harness only for the commands that ask for one

    overrides = segmentation_kwargs(args)
    for flag, key in (("num_classes", "out_channels"), ("in_chans", "in_channels"), ("spatial_dims", "spatial_dims")):
        if getattr(args, flag) is not None:
            overrides[key] = getattr(args, flag)
    return segmentation_spec(args.model, overrides)


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def _bn_size(text: str) -> int | str:
    if text.lower() == "none":
        return "none"
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer or 'none', got {text!r}") from None


class ModelKwargs(argparse.Action):
    """timm's ``--model-kwargs KEY=VALUE ...`` (as :class:`timm.utils.ParseKwargs` of timm >= 1.0.30 reads them:
    values are Python literals, else strings, and may hold ``=``; older timm splits at every ``=``), with a one-line
    argparse error naming the option for a pair that is not ``KEY=VALUE``."""

    def __call__(self, parser: argparse.ArgumentParser, namespace: argparse.Namespace,
                 values: str | Sequence[Any] | None, option_string: str | None = None) -> None:
        values = [value for value in values or [] if value]  # timm skips empty ones too
        for value in values:
            key, eq, text = value.partition("=")
            if not eq or not key.isidentifier():
                raise argparse.ArgumentError(self, f"{value!r} is not KEY=VALUE; give DenseNet arguments as timm "
                                                   "does, e.g. growth_rate=12 block_config='(3,3,3)'")
            if text.lstrip()[:1] in "([{" and text.strip():
                # A bracket means a literal was meant: timm would silently keep a malformed one as a string.
                try:
                    ast.literal_eval(text)
                except (ValueError, SyntaxError):
                    raise argparse.ArgumentError(self, f"{key}: {text!r} is not a valid Python literal") from None
        kwargs: dict[str, Any] = {}
        for value in values:
            key, _, text = value.partition("=")
            try:
                kwargs[key] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                kwargs[key] = text  # a plain string needs no quotes on the command line
        setattr(namespace, self.dest, kwargs)


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line on stderr (``prog: error: ...``), without the usage block.

    Under torchrun every rank parses the same command line: it is printed once (:func:`report_once`)."""

    def error(self, message: str) -> Any:
        report_once(f"{self.prog}: error: {message} (see --help)")
        self.exit(2)


def img_size_problem(sizes: Sequence[int] | None) -> str | None:
    """What is wrong with the numbers given to an --img-size that takes an edge, H W or D H W, if anything."""
    if sizes is not None and len(sizes) > 3:
        return f"--img-size takes 1 to 3 numbers (N, H W or D H W), got {len(sizes)}"
    return None


def img_size_flag(sizes: Sequence[int]) -> str:
    """--img-size as it was typed, for a message."""
    return f"--img-size {' '.join(map(str, sizes))}"


def positive_int(text: str) -> int:
    """argparse type for integers >= 1."""
    value = _int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type for integers >= 0."""
    value = _int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def integer_in(low: int, high: int) -> Callable[[str], int]:
    """An argparse type for integers from ``low`` to ``high``."""
    def parse(text: str) -> int:
        value = _int(text)
        if not low <= value <= high:
            raise argparse.ArgumentTypeError(f"must be from {low} to {high}, got {value}")
        return value

    return parse


# torch.manual_seed's range is [-2**63, 2**64); the tools add small offsets (per step, per rank) to the seed.
SEED_RANGE = (-(2 ** 63), 2 ** 63 - 1)


def seed(text: str) -> int:
    """argparse type for a random seed: an integer torch.manual_seed takes, with room for the tools' offsets."""
    value = _int(text)
    if not SEED_RANGE[0] <= value <= SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be between {SEED_RANGE[0]} and {SEED_RANGE[1]}, got {value}")
    return value


def max_threads() -> int:
    """The most torch CPU threads a tool accepts: torch crashes (segfault) when it cannot start the threads it was
    told to use, and more threads than cores only contend for them."""
    return max(1024, os.cpu_count() or 1)


def thread_count(text: str) -> int:
    """argparse type for torch CPU threads: 1 to :func:`max_threads`."""
    value = positive_int(text)
    if value > max_threads():
        raise argparse.ArgumentTypeError(f"must be at most {max_threads()} (this machine has {os.cpu_count()} "
                                         f"cores), got {value}")
    return value


def _int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None


def float_list(text: str) -> Sequence[float]:
    """argparse type for comma-separated positive (finite) numbers."""
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or not all(0 < v < math.inf for v in values):  # NaN fails both comparisons
        raise argparse.ArgumentTypeError(f"expected positive numbers, got {text!r}")
    return values
