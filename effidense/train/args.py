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
from timm.utils import ParseKwargs

from ..densenet import MEMORY_MODES
from ..modelspec import non_negative_int, positive_int
from .errors import TrainError

__all__ = ["build_parser", "parse_args", "args_as_dict", "args_to_yaml", "WRAPPER_HINT"]

WRAPPER_HINT = ("for any other timm train.py flag run timm's own script with effidense's models registered: "
                "effidense timm /path/to/timm/train.py [timm flags]")


def _learning_rate(text: str) -> float:
    value = float(text)
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0, got {text}")
    return value


def _smoothing(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"label smoothing must be in [0, 1), got {text}")
    return value


class _ModelKwargs(ParseKwargs):
    """timm's ``KEY=VALUE`` pairs (values read as Python literals, else as strings); anything else, such as a JSON
    object, is a one-line error naming ``--model-kwargs``."""

    def __call__(self, parser, namespace, values, option_string=None):  # type: ignore[override]
        for value in values or []:
            key = value.split("=", 1)[0]
            if value and ("=" not in value or not key.isidentifier()):
                parser.error(f"argument --model-kwargs: {value!r} is not KEY=VALUE; give create_model arguments "
                             "as timm does, e.g. --model-kwargs growth_rate=12 block_config='(3,3,3)'")
        super().__call__(parser, namespace, values, option_string)


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line, and whose unknown-flag error says where the other timm flags
    are."""

    def error(self, message: str):  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (--help lists the flags)\n")

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
    group.add_argument("--train-num-samples", type=positive_int, default=1024, metavar="N",
                       help="images in the synthetic training set (default: 1024)")
    group.add_argument("--val-num-samples", type=positive_int, default=256, metavar="N",
                       help="images in the synthetic validation set (default: 256)")

    group = parser.add_argument_group("Model")
    group.add_argument("--model", default="effi_densenet121", metavar="MODEL",
                       help="timm model name (default: effi_densenet121)")
    group.add_argument("--pretrained", action="store_true", help="start from the model's pretrained weights")
    group.add_argument("--pretrained-path", default=None, metavar="PATH",
                       help="start from the weights in this file (implies --pretrained; as timm does, the "
                            "classifier is re-initialised and in_chans adapted)")
    group.add_argument("--initial-checkpoint", default="", metavar="PATH",
                       help="initialise the model from this checkpoint (.safetensors or .pth, loaded strictly)")
    group.add_argument("--resume", default="", metavar="PATH",
                       help="continue a run: a run directory, or its last.state.pt / last.safetensors, from its newest "
                            "complete checkpoint (a run killed before its first checkpoint starts from the "
                            "beginning). Keeps writing into that directory unless --output/--experiment name another")
    group.add_argument("--num-classes", type=positive_int, default=None, metavar="N",
                       help="label classes (default: the dataset's)")
    group.add_argument("--model-kwargs", nargs="*", default={}, action=_ModelKwargs, metavar="KEY=VALUE",
                       help="extra create_model arguments, values as Python literals, e.g. "
                            "block_config='(3,3,3)' growth_rate=12")
    group.add_argument("--drop", type=float, default=0.0, metavar="PCT", help="dropout before the classifier")
    group.add_argument("--img-size", type=positive_int, default=None, metavar="N",
                       help="image size (default: the model's pretrained_cfg input size)")
    group.add_argument("--memory", choices=MEMORY_MODES, default=None,
                       help="effidense memory mode: plain (keep everything), efficient (recompute concat-BN-ReLU, "
                            "the default of effi_* models) or frugal (recompute whole layers, least memory)")
    group.add_argument("--grad-checkpointing", action="store_true",
                       help="model.set_grad_checkpointing(): for effi_* models selects 'frugal' (their default, "
                            "'efficient', already checkpoints) unless --memory says otherwise")
    group.add_argument("--channels-last", action="store_true", help="use the channels_last memory format")
    group.add_argument("--torchcompile", nargs="?", type=str, default=None, const="inductor", metavar="BACKEND",
                       help="compile the model with torch.compile (backend default inductor); effi_* models compile "
                            "as --compile-scope says")
    group.add_argument("--compile-scope", choices=("layers", "model"), default="layers",
                       help="effi_* models: 'layers' compiles the BN-ReLU segments (seconds), 'model' the whole model "
                            "(minutes; least host overhead on a fast GPU). Default: layers")
    group.add_argument("--sync-bn", action="store_true", help="SyncBatchNorm across processes (CUDA only)")

    group = parser.add_argument_group("Optimizer and schedule")
    group.add_argument("--opt", default="sgd", metavar="OPTIMIZER",
                       help="timm optimizer name: 'sgd' is SGD with Nesterov momentum, 'momentum' without Nesterov, "
                            "also adamw, lamb, ... (default: sgd)")
    group.add_argument("--lr", type=_learning_rate, default=None, metavar="LR",
                       help="learning rate (default: 0.1 x global batch / 256, timm's rule for SGD; the square root "
                            "of the ratio for ada*/lamb optimizers)")
    group.add_argument("--momentum", type=float, default=0.9, metavar="M", help="optimizer momentum (default: 0.9)")
    group.add_argument("--weight-decay", type=float, default=2e-5, help="weight decay (default: 2e-5)")
    group.add_argument("--clip-grad", type=float, default=None, metavar="NORM", help="clip gradient norm")
    group.add_argument("--sched", default="cosine", choices=("cosine", "step", "multistep", "tanh", "poly", "plateau"),
                       help="learning-rate schedule (default: cosine)")
    group.add_argument("--sched-on-updates", action="store_true",
                       help="update the schedule after every optimizer step instead of every epoch")
    group.add_argument("--epochs", type=positive_int, default=300, metavar="N", help="epochs (default: 300)")
    group.add_argument("--warmup-epochs", type=non_negative_int, default=5, metavar="N",
                       help="linear warm-up epochs (default: 5)")
    group.add_argument("--warmup-lr", type=float, default=1e-5, metavar="LR", help="warm-up start lr (default: 1e-5)")
    group.add_argument("--min-lr", type=float, default=0.0, metavar="LR", help="lowest lr of cosine/poly (default: 0)")
    group.add_argument("--decay-epochs", type=float, default=90, metavar="N", help="step schedule interval")
    group.add_argument("--decay-milestones", type=int, nargs="+", default=[90, 180, 270], metavar="EPOCH",
                       help="multistep schedule: epochs at which the lr is multiplied by --decay-rate")
    group.add_argument("--decay-rate", "--dr", type=float, default=0.1, metavar="RATE", help="lr decay factor")
    group.add_argument("--cooldown-epochs", type=non_negative_int, default=0, metavar="N",
                       help="epochs at min lr after the schedule ends")
    group.add_argument("--grad-accum-steps", type=positive_int, default=1, metavar="N",
                       help="accumulate gradients over N batches per optimizer step")

    group = parser.add_argument_group("Augmentation and regularisation")
    group.add_argument("--no-aug", action="store_true", help="no training augmentation (resize and crop only)")
    group.add_argument("--scale", type=float, nargs=2, default=[0.08, 1.0], metavar="PCT",
                       help="random-resized-crop area range (default: 0.08 1.0)")
    group.add_argument("--hflip", type=float, default=0.5, help="horizontal flip probability (default: 0.5)")
    group.add_argument("--color-jitter", type=float, default=0.4, metavar="PCT", help="colour jitter (default: 0.4)")
    group.add_argument("--smoothing", type=_smoothing, default=0.1, help="label smoothing in [0, 1) (default: 0.1)")

    group = parser.add_argument_group("Precision, EMA, batches")
    group.add_argument("-b", "--batch-size", type=positive_int, default=128, metavar="N",
                       help="batch size per process (default: 128)")
    group.add_argument("-vb", "--validation-batch-size", type=positive_int, default=None, metavar="N",
                       help="validation batch size (default: --batch-size)")
    group.add_argument("--amp", action="store_true", help="automatic mixed precision (torch.amp.autocast)")
    group.add_argument("--amp-dtype", default="float16", choices=("float16", "bfloat16"),
                       help="autocast dtype; float16 also uses a GradScaler (default: float16)")
    group.add_argument("--model-ema", action="store_true",
                       help="keep an EMA of the weights (timm ModelEmaV3); it is evaluated and picks the best")
    group.add_argument("--model-ema-decay", type=float, default=0.9998, help="EMA decay (default: 0.9998)")

    group = parser.add_argument_group("Run")
    group.add_argument("--output", default="", metavar="DIR", help="parent of the run directory (default: "
                       "./output/train); the run directory is OUTPUT/EXPERIMENT")
    group.add_argument("--experiment", default="", metavar="NAME",
                       help="run directory name (default: date-time-model-imgsize)")
    group.add_argument("--force", action="store_true",
                       help="start a new run in a directory that already holds one (its files are replaced)")
    group.add_argument("--eval-metric", default="top1", choices=("top1", "top5", "loss"),
                       help="validation metric that picks model_best (default: top1)")
    group.add_argument("--checkpoint-interval", "--recovery-interval", type=non_negative_int, default=0,
                       metavar="N", help="also save last.* every N optimizer steps inside an epoch, so a killed run "
                                         "loses at most N steps (default: 0, epoch ends only)")
    group.add_argument("--seed", type=int, default=42, help="random seed (default: 42)")
    group.add_argument("-j", "--workers", type=non_negative_int, default=4, metavar="N",
                       help="data loading processes per training process (default: 4)")
    group.add_argument("--log-interval", type=positive_int, default=50, metavar="N",
                       help="batches between progress-bar updates (default: 50)")
    group.add_argument("--device", default=None, help="torch device type (default: cuda if available, else cpu)")
    return parser


def _load_config(path: str, parser: argparse.ArgumentParser) -> dict[str, Any]:
    file = Path(path)
    if not file.is_file():
        raise TrainError(f"--config {path}: no such file")
    try:
        config = yaml.safe_load(file.read_text()) or {}
    except yaml.YAMLError as e:
        raise TrainError(f"--config {path}: not valid YAML ({e})") from e
    if not isinstance(config, dict):
        raise TrainError(f"--config {path}: expected a mapping of flag names to values, got {type(config).__name__}")
    known = {action.dest for action in parser._actions}
    config = {str(key).replace("-", "_"): value for key, value in config.items()}
    unknown = sorted(key for key in config if key not in known)
    if unknown:
        raise TrainError(f"--config {path}: unsupported key(s) {', '.join(unknown)}; {WRAPPER_HINT}")
    config.pop("config", None)
    return config


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse built-in trainer arguments: ``--config`` defaults first, then the command line on top."""
    parser = build_parser()
    config_parser = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    config_parser.add_argument("-c", "--config", default="")
    known, _ = config_parser.parse_known_args(argv)
    if known.config:
        parser.set_defaults(**_load_config(known.config, parser))
    args = parser.parse_args(argv)
    if isinstance(args.model_kwargs, list):  # `--model-kwargs` given with no pairs
        args.model_kwargs = {}
    for flag, check in (("lr", _learning_rate), ("smoothing", _smoothing)):  # values from --config skip `type`
        value = getattr(args, flag)
        if value is not None:
            try:
                check(str(value))
            except (argparse.ArgumentTypeError, ValueError) as e:
                raise TrainError(f"--{flag} {value}: {e}") from e
    if not isinstance(args.model_kwargs, dict):  # from --config
        raise TrainError(f"--config {known.config}: model_kwargs must be a mapping of create_model arguments, got "
                         f"{args.model_kwargs!r}")
    return args


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
