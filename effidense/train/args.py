"""Command line of the built-in trainer: the common flags of timm's ``train.py``, with timm's names and meanings.

Flags timm's ``train.py`` has but this trainer does not (mixup, auto-augment, layer decay, ...) are rejected with a
message that points to wrapper mode, which runs timm's own script. ``--config FILE.yaml`` supplies defaults; its keys
are flag names (``batch-size`` or ``batch_size``), and flags on the command line override it.
"""
from __future__ import annotations

import argparse
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from ..choices import MEMORY_MODES
from ..cli.flags import ModelKwargs, OneLineParser, integer_in
from .errors import TrainError

__all__ = ["build_parser", "parse_args", "args_as_dict", "args_to_yaml", "WRAPPER_HINT"]

WRAPPER_HINT = ("for any other timm train.py flag run timm's own script with effidense's models registered: "
                "effidense timm /path/to/timm/train.py [timm flags]")


_FLOAT32_MAX = 3.4028234663852886e38  # hyperparameters reach float32 tensors (torch's optimizers refuse larger)


def _number(text: str, low: float, high: float, need: str, high_open: bool = False, low_open: bool = False) -> float:
    """``text`` as a float in [low, high] (an end left out where open); otherwise an error saying it ``need``s to
    be."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be {need}, got {text}") from None
    if not (math.isfinite(value) and low <= value <= high) or (high_open and value == high) or \
            (low_open and value == low):
        too_large = math.isfinite(value) and value > _FLOAT32_MAX
        raise argparse.ArgumentTypeError(f"must be {need}{f' (at most {_FLOAT32_MAX:.4g})' if too_large else ''}, "
                                         f"got {text}")
    return value


# Counts reach torch, numpy and the data loader as C integers; none is meaningful beyond a 32-bit one.
_INT32_MAX = 2**31 - 1
_SEED_MAX = 2**32 - 1  # numpy's seeds (timm seeds numpy, torch and Python alike)
_WORKERS_MAX = 256  # data-loading processes per training process: far past what any machine gains from


_count = integer_in(1, _INT32_MAX)
_count_or_zero = integer_in(0, _INT32_MAX)


def _non_negative(text: str) -> float:
    """A finite number >= 0 that a float32 holds: a learning rate, momentum, weight decay, decay rate."""
    return _number(text, 0.0, _FLOAT32_MAX, "a finite number >= 0")


def _positive(text: str) -> float:
    return _number(text, 0.0, _FLOAT32_MAX, "a finite number > 0", low_open=True)


def _fraction(text: str) -> float:
    return _number(text, 0.0, 1.0, "a number in [0, 1]")


def _bn_eps(text: str) -> float:  # not 0: BatchNorm would divide by a zero variance's square root
    return _number(text, 0.0, 1.0, "a number in (0, 1]", low_open=True)


def _smoothing(text: str) -> float:
    return _number(text, 0.0, 1.0, "in [0, 1) (label smoothing)", high_open=True)


class _Parser(OneLineParser):
    """A one-line-error parser whose unknown-flag error says where the other timm flags are."""

    def parse_known_args(self, args=None, namespace=None):  # type: ignore[override]
        parsed, unknown = super().parse_known_args(args, namespace)
        if unknown:
            self.error(f"unsupported argument(s) for the built-in trainer: {' '.join(unknown)}; it takes the common "
                       f"timm train.py flags listed in --help. {WRAPPER_HINT}")
        return parsed, unknown


def build_parser() -> argparse.ArgumentParser:
    """The built-in trainer's parser (flag names, defaults and meanings follow timm's ``train.py``)."""
    parser = _Parser(
        prog="effidense train",
        description="Train a timm model (effi_* DenseNets included) with effidense's built-in timm-based trainer. "
                    "Runs single-process or under `torchrun --nproc_per_node N` (DistributedDataParallel).",
        epilog="Wrapper mode: `effidense timm PATH [args]` imports effidense and runs timm's train.py, validate.py, "
               "benchmark.py or "
               "inference.py from a timm checkout as __main__ with the remaining arguments, so every timm flag works "
               "unchanged.",
        allow_abbrev=False,
    )
    parser.add_argument("-c", "--config", default="", metavar="FILE",
                        help="YAML file of defaults; keys are flag names (dashes or underscores). Flags override it.")

    group = parser.add_argument_group("Dataset")
    group.add_argument("--data-dir", default=None, metavar="DIR",
                       help="dataset root: an ImageFolder root holding train/ and val/ (ImageNet layout) or the "
                            "torchvision download folder for torch/cifar10 and torch/cifar100")
    group.add_argument("--dataset", "-d", default="", metavar="NAME",
                       help="'' or 'folder' (ImageFolder, default), 'torch/cifar10', 'torch/cifar100', or "
                            "'synthetic' (random images with a class-dependent offset, for smoke runs)")
    group.add_argument("--train-split", default="train", metavar="NAME", help="training split (default: train)")
    group.add_argument("--val-split", default="validation", metavar="NAME",
                       help="validation split; for folders val/, validation/, valid/ ... are all found "
                            "(default: validation)")
    group.add_argument("--dataset-download", action="store_true",
                       help="allow torchvision to download torch/cifar10 or torch/cifar100 (never done otherwise)")
    group.add_argument("--train-num-samples", type=_count, default=1024, metavar="N",
                       help="images in the synthetic training set (default: 1024)")
    group.add_argument("--val-num-samples", type=_count, default=256, metavar="N",
                       help="images in the synthetic validation set (default: 256)")

    group = parser.add_argument_group("Model")
    group.add_argument("--model", default="effi_densenet121", metavar="MODEL",
                       help="timm model name (default: effi_densenet121)")
    group.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    group.add_argument("--pretrained-path", default=None, metavar="PATH",
                       help="start from the weights in this file (implies --pretrained; as timm does, the "
                            "classifier is re-initialised and in_chans adapted). Every other tensor must come from "
                            "the file: one that does not fit the model is refused")
    group.add_argument("--initial-checkpoint", default="", metavar="PATH",
                       help="initialise the model from this checkpoint (.safetensors or .pth, loaded strictly)")
    group.add_argument("--resume", default="", metavar="PATH",
                       help="continue a run: a run directory, or its last.state.pt / last.safetensors, from its newest "
                            "complete checkpoint, with the run's own arguments (its args.yaml; flags given here "
                            "override them). A run killed before its first checkpoint (or before its directory "
                            "existed) starts from the beginning; a directory holding results without their "
                            "checkpoint is refused unless --force. Keeps writing into that directory unless "
                            "--output/--experiment name another")
    group.add_argument("--num-classes", type=_count, default=None, metavar="N",
                       help="label classes (default: the dataset's)")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=ModelKwargs, metavar="KEY=VALUE",
                       help="extra create_model arguments, values as Python literals, e.g. "
                            "block_config='(3,3,3)' growth_rate=12")
    group.add_argument("--drop", type=_fraction, default=0.0, metavar="PCT", help="dropout before the classifier")
    group.add_argument("--bn-momentum", type=_fraction, default=None, metavar="M",
                       help="every BatchNorm's momentum, as timm's train.py passes it (bn_momentum); default the "
                            "model's")
    group.add_argument("--bn-eps", type=_bn_eps, default=None, metavar="EPS",
                       help="every BatchNorm's epsilon, as timm's train.py passes it (bn_eps); default the model's")
    group.add_argument("--img-size", type=_count, default=None, metavar="N",
                       help="image size (default: the model's pretrained_cfg input size)")
    group.add_argument("--memory", choices=MEMORY_MODES, default=None,
                       help="effidense memory mode: plain (keep everything), efficient (recompute concat-BN-ReLU, "
                            "the default of effi_* models) or frugal (recompute whole layers, least memory)")
    group.add_argument("--grad-checkpointing", action="store_true",
                       help="model.set_grad_checkpointing(): for effi_* models selects 'frugal' (their default, "
                            "'efficient', already recomputes) unless --memory says otherwise")
    group.add_argument("--channels-last", action="store_true", help="use the channels_last memory format")
    group.add_argument("--torchcompile", nargs="?", type=str, default=None, const="inductor", metavar="BACKEND",
                       help="compile the whole model with torch.compile (backend default inductor; effi_* models "
                            "in place, so checkpoints keep their keys). Compiling a deep model takes minutes and pays "
                            "only where the eager step is host-bound: check with 'effidense bench --compile' first")
    group.add_argument("--sync-bn", action="store_true",
                       help="SyncBatchNorm across processes: effidense's models on CUDA or the CPU, exactly in every "
                            "memory mode; other models on CUDA")

    group = parser.add_argument_group("Optimizer and schedule")
    group.add_argument("--opt", default="sgd", metavar="OPTIMIZER",
                       help="timm optimizer name: 'sgd' is SGD with Nesterov momentum, 'momentum' without Nesterov, "
                            "also adamw, lamb, ... (default: sgd)")
    group.add_argument("--lr", type=_non_negative, default=None, metavar="LR",
                       help="learning rate (default: 0.1 x global batch / 256, timm's rule for SGD; the square root "
                            "of the ratio for ada*/lamb optimizers)")
    group.add_argument("--momentum", type=_non_negative, default=0.9, metavar="M",
                       help="optimizer momentum (default: 0.9)")
    group.add_argument("--weight-decay", type=_non_negative, default=2e-5, help="weight decay (default: 2e-5)")
    group.add_argument("--clip-grad", type=_positive, default=None, metavar="NORM", help="clip gradient norm")
    group.add_argument("--sched", default="cosine", choices=("cosine", "step", "multistep", "tanh", "poly", "plateau"),
                       help="learning-rate schedule (default: cosine)")
    group.add_argument("--sched-on-updates", action="store_true",
                       help="update the schedule after every optimizer step instead of every epoch")
    group.add_argument("--epochs", type=_count, default=300, metavar="N", help="epochs (default: 300)")
    group.add_argument("--warmup-epochs", type=_count_or_zero, default=5, metavar="N",
                       help="linear warm-up epochs (default: 5)")
    group.add_argument("--warmup-lr", type=_non_negative, default=1e-5, metavar="LR",
                       help="warm-up start lr (default: 1e-5)")
    group.add_argument("--min-lr", type=_non_negative, default=0.0, metavar="LR",
                       help="lowest lr of cosine/poly (default: 0)")
    group.add_argument("--decay-epochs", type=_positive, default=90, metavar="N", help="step schedule interval")
    group.add_argument("--decay-milestones", type=_count_or_zero, nargs="+", default=[90, 180, 270], metavar="EPOCH",
                       help="multistep schedule: epochs at which the lr is multiplied by --decay-rate")
    group.add_argument("--decay-rate", "--dr", type=_non_negative, default=0.1, metavar="RATE", help="lr decay factor")
    group.add_argument("--cooldown-epochs", type=_count_or_zero, default=0, metavar="N",
                       help="epochs at min lr after the schedule ends")
    group.add_argument("--grad-accum-steps", type=_count, default=1, metavar="N",
                       help="accumulate gradients over N batches per optimizer step")

    group = parser.add_argument_group("Augmentation and regularisation")
    group.add_argument("--no-aug", action="store_true", help="no training augmentation (resize and crop only)")
    group.add_argument("--scale", type=_fraction, nargs=2, default=[0.08, 1.0], metavar="PCT",
                       help="random-resized-crop area range (default: 0.08 1.0)")
    group.add_argument("--hflip", type=_fraction, default=0.5, help="horizontal flip probability (default: 0.5)")
    group.add_argument("--color-jitter", type=_non_negative, default=0.4, metavar="PCT",
                       help="colour jitter (default: 0.4)")
    group.add_argument("--smoothing", type=_smoothing, default=0.1, help="label smoothing in [0, 1) (default: 0.1)")

    group = parser.add_argument_group("Precision, EMA, batches")
    group.add_argument("-b", "--batch-size", type=_count, default=128, metavar="N",
                       help="batch size per process (default: 128)")
    group.add_argument("-vb", "--validation-batch-size", type=_count, default=None, metavar="N",
                       help="validation batch size (default: --batch-size)")
    group.add_argument("--amp", action="store_true", help="automatic mixed precision (torch.amp.autocast)")
    group.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"),
                       help="autocast dtype; float16 also uses a GradScaler (default: float16)")
    group.add_argument("--model-ema", action="store_true",
                       help="keep an EMA of the weights (timm ModelEmaV3); it is evaluated and picks the best")
    group.add_argument("--model-ema-decay", type=_fraction, default=0.9998, help="EMA decay (default: 0.9998)")

    group = parser.add_argument_group("Run")
    group.add_argument("--output", default="", metavar="DIR", help="parent of the run directory (default: "
                       "./output/train); the run directory is OUTPUT/EXPERIMENT")
    group.add_argument("--experiment", default="", metavar="NAME",
                       help="run directory name (default: date-time-model-imgsize)")
    group.add_argument("--force", action="store_true",
                       help="start a new run in a directory that already holds one (its files are replaced)")
    group.add_argument("--eval-metric", default="top1", choices=("top1", "top5", "loss"),
                       help="validation metric that picks model_best (default: top1)")
    group.add_argument("--checkpoint-interval", "--recovery-interval", type=_count_or_zero, default=0,
                       metavar="N", help="also save last.* every N optimizer steps inside an epoch, so a killed run "
                                         "loses at most N steps (default: 0, epoch ends only)")
    group.add_argument("--seed", type=integer_in(0, _SEED_MAX), default=42, help="random seed (default: 42)")
    group.add_argument("-j", "--workers", type=integer_in(0, _WORKERS_MAX), default=4, metavar="N",
                       help="data loading processes per training process (default: 4)")
    group.add_argument("--log-interval", type=_count, default=50, metavar="N",
                       help="batches between progress-bar updates (default: 50)")
    group.add_argument("--device", default=None, help="torch device type (default: cuda if available, else cpu)")
    return parser


def _load_config(path: str | Path, parser: argparse.ArgumentParser, source: str,
                 retired: tuple[str, ...] = ()) -> dict[str, Any]:
    """The flag values in the YAML file ``path``; errors name ``source`` (``--config FILE``, ``--resume RUN``)."""
    file = Path(path)
    if not file.is_file():
        raise TrainError(f"{source}: no such file")
    try:
        config = yaml.safe_load(file.read_text()) or {}
    except (yaml.YAMLError, OSError, UnicodeDecodeError) as e:
        raise TrainError(f"{source}: {file} is not valid YAML ({' '.join(str(e).split())})") from None
    if not isinstance(config, dict):
        raise TrainError(f"{source}: {file}: expected a mapping of flag names to values, got {type(config).__name__}")
    actions = {action.dest: action for action in parser._actions if action.option_strings and action.dest != "help"}
    config = {str(key).replace("-", "_"): value for key, value in config.items()}
    for key in retired:
        config.pop(key, None)
    unknown = sorted(key for key in config if key not in actions)
    if unknown:
        raise TrainError(f"{source}: {file}: unsupported key(s) {', '.join(unknown)}; {WRAPPER_HINT}")
    config.pop("config", None)
    return {key: _checked_value(value, actions[key], f"{source}: {file}") for key, value in config.items()}


def _flag(action: argparse.Action) -> str:
    return max(action.option_strings, key=len)


def _checked_value(value: Any, action: argparse.Action, source: str) -> Any:
    """``value`` from a YAML file for ``action``, put through what the flag's value goes through on the command line
    (its type, choices and count of values), so that no value skips the checks by coming from a file."""
    def fail(why: str) -> TrainError:
        return TrainError(f"{source}: {_flag(action)} {value!r}: {why}")

    if isinstance(action, ModelKwargs):
        if not isinstance(value, dict):
            raise fail("expected a mapping of create_model arguments")
        return value
    if action.nargs == 0:  # a switch (store_true)
        if not isinstance(value, bool):
            raise fail("expected true or false")
        return value
    if value is None:
        if action.default is not None and action.nargs != "?":
            raise fail(f"a value is needed (the default is {action.default!r})")
        return value
    if action.nargs in (None, "?"):
        return _one_value(value, action, fail)
    if not isinstance(value, (list, tuple)):
        raise fail("expected a list of values")
    if (isinstance(action.nargs, int) and len(value) != action.nargs) or (action.nargs == "+" and not value):
        raise fail(f"expected {action.nargs if isinstance(action.nargs, int) else 'one or more'} values")
    return [_one_value(item, action, fail) for item in value]


def _one_value(value: Any, action: argparse.Action, fail: Any) -> Any:
    if isinstance(value, (list, tuple, dict)):
        raise fail("expected a single value")
    if isinstance(value, bool) and action.type not in (None, str):
        raise fail("expected a number, not true/false")
    try:
        converted = action.type(str(value)) if callable(action.type) else str(value)
    except (argparse.ArgumentTypeError, ValueError) as e:
        raise fail(str(e)) from None
    if action.choices is not None and converted not in action.choices:
        raise fail(f"choose from {', '.join(map(str, action.choices))}")
    return converted


# What a resumed run does not take from its own args.yaml: where it is and how it was started.
_NOT_RESUMED = ("config", "resume", "output", "experiment", "force", "timm_script")


# Flags the trainer no longer takes, which args.yaml files of earlier runs still hold: a run resumes without them
# (compile_scope: whole-model compile is the one compile path).
_RETIRED = ("compile_scope",)


def _run_arguments(resume: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    """The arguments a run was started with (its ``args.yaml``), for ``--resume RUN``; empty when it has none."""
    path = Path(resume)
    file = (path if path.is_dir() else path.parent) / "args.yaml"
    if not file.exists():
        return {}
    run_args = _load_config(file, parser, f"--resume {resume}", retired=_RETIRED)
    for key in _NOT_RESUMED:
        run_args.pop(key, None)
    return run_args


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse built-in trainer arguments. Layers, each over the one before: the defaults; with ``--resume RUN`` the
    run's own arguments (``RUN/args.yaml``, less where and how it was started); ``--config FILE``; the command
    line."""
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config_parser.add_argument("-c", "--config", default="")
    config_parser.add_argument("--resume", default="")
    known, _ = config_parser.parse_known_args(argv)
    if known.resume:
        parser.set_defaults(**_run_arguments(known.resume, parser))
    if known.config:
        parser.set_defaults(**_load_config(known.config, parser, f"--config {known.config}"))
    args = parser.parse_args(argv)
    if isinstance(args.model_kwargs, list):  # `--model-kwargs` given with no pairs
        args.model_kwargs = {}
    none = [key for key, value in args.model_kwargs.items() if value is None]
    if none:
        raise TrainError(dropped_by_timm(none))
    given = [key for key in ("bn_momentum", "bn_eps") if getattr(args, key) is not None and key in args.model_kwargs]
    if given:
        raise TrainError(f"--{given[0].replace('_', '-')} and --model-kwargs {given[0]}=... both set it; pass one")
    if not 0 < args.scale[1] or args.scale[0] > args.scale[1]:
        raise TrainError(f"--scale {args.scale[0]} {args.scale[1]}: expected MIN MAX with 0 <= MIN <= MAX and "
                         "MAX > 0 (fractions of the image area)")
    return args


def dropped_by_timm(keys: Sequence[str]) -> str:
    """Why ``--model-kwargs KEY=None`` is refused: timm.create_model would build the model with its defaults for
    them, silently."""
    return (f"--model-kwargs {' '.join(f'{key}=None' for key in keys)}: timm.create_model drops arguments set to "
            "None, so the model's default would apply; leave them out for the default"
            + ("; backward_slices=1 slices no backward" if "backward_slices" in keys else ""))


def args_as_dict(args: argparse.Namespace) -> dict[str, Any]:
    """The arguments as plain YAML/weights_only-safe values (tuples become lists)."""
    def plain(value: Any) -> Any:
        if isinstance(value, (tuple, list)):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        return value if value is None or isinstance(value, (bool, int, float, str)) else str(value)

    return {key: plain(value) for key, value in vars(args).items()}


def args_to_yaml(args: argparse.Namespace) -> str:
    """The arguments as a YAML document that ``--config`` reads back."""
    return yaml.safe_dump(args_as_dict(args), sort_keys=False)
