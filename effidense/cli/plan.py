"""Will it fit? Predict the peak memory of a training step and the largest batch for a GPU, without the GPU.

Each variant (our memory modes and the torchvision/timm peers, as in bench) runs training steps on tensors that
allocate nothing (torch's FakeTensorMode on the CPU): every tensor storage the step makes and frees is counted,
backward and checkpoint recomputation included. A step is zero_grad, forward (autocast with --amp), cross-entropy,
backward and the optimizer's update. The peak is affine in the batch: a step at --batch-size and one near the
budget give the line, and the largest batch that fits --budget less the safety margin is measured, with the batch
above it. With a 3D input (--img-size D H W, or --volume N) the largest cube edge at --batch-size is searched too.
Seconds on a CPU, no GPU needed.

Every figure is PREDICTED. --device says what the step runs on: cuda (default) or cpu, whose kernels' scratch
(BatchNorm backward's temporary, oneDNN's reorders) is counted at --threads. Not counted on CUDA: the context,
cuDNN/cuBLAS workspaces, the allocator's rounding and fragmentation, NCCL buffers: --margin (default 5% on cuda,
1% on the cpu) holds back part of the budget for them.

--check N runs one real step of each variant at batch N (default 2) on this machine's device (the GPU if torch
sees one, else the CPU) and prints the predicted peak beside the allocator's (torch.cuda.max_memory_allocated on a
GPU, the CPU allocator's events by torch.profiler), so you see in seconds how far to trust the plan.
Examples:

  effidense plan --model effi_densenet121 --img-size 224 --batch-size 64 --amp bf16 --budget h100-80gb
  effidense plan --model effi_densenet121 --amp bf16 --budget rtx4090-24gb --optimizer adamw --json plan.json
  effidense plan --model effi_densenet_bc100_k12 --batch-size 64 --budget 12gb --plot plan.png
  python tools/plan.py --model effi_densenet121 --budget 24GiB --variants efficient,frugal,tv --margin 0.1
  effidense plan --model fcdensenet103 --img-size 360 480 --batch-size 1 --budget 12GiB
  effidense plan --model effi_densenet121 --img-size 112 --check 4

FC-DenseNet (--model fcdensenet56, 67 or 103: segmentation, a label per position) compares its memory modes with
`reference`, a port that concatenates as the common PyTorch ports do; --model-kwargs go to FCDenseNet.

MONAI's names (--model DenseNet121, DenseNet169, DenseNet201 or DenseNet264) plan effidense.monai's drop-in exactly
as `effidense.monai.DenseNet121(spatial_dims, in_channels, out_channels, memory=...)` builds it, beside MONAI's own
class (`monai`), with --model-kwargs in MONAI's names (init_features=, norm=, ...); --in-chans defaults to 1 and
--num-classes to 2, and --volume N (or --spatial-dims 3) makes it 3D:
  effidense plan --model DenseNet121 --volume 96 --batch-size 2 --amp bf16 --budget a100-80gb
torchvision's builder names (densenet121, densenet161, ...) are the bare config names above.
"""
from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Any

from ..choices import AMP_NAMES, DTYPE_NAMES, MEMORY_MODES, MONAI_MODELS, OPTIMIZERS, PEERS, SEGMENTATION_MODELS
from ..configs import model_names, unknown_model_message
from ..planner.budget import DEFAULT_MARGINS, DEVICES, GPU_PRESETS, parse_budget
from .flags import (
    OneLineParser,
    add_model_arguments,
    img_size_flag,
    img_size_problem,
    positive_int,
    segmentation_kwargs,
    spec_from_args,
    thread_count,
)

if TYPE_CHECKING:
    from ..modelspec import ModelSpec

PROG = "effidense plan"
DEFAULT_MODEL = "effi_densenet121"


def _margin(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction such as 0.05, got {text!r}") from None
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 0 and below 1, got {text}")
    return value


class _BudgetType:
    """argparse type whose error message is parse_budget's own line."""

    __name__ = "budget"

    def __call__(self, text: str) -> str:
        try:
            parse_budget(text)  # checked while parsing: one line naming --budget
            return text
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, DEFAULT_MODEL)
    run = parser.add_argument_group("the step")
    run.add_argument("--variants",
                     help=f"comma-separated variants from {', '.join((*MEMORY_MODES, *PEERS))}, as in bench "
                          "(default: plain,efficient,frugal plus the peers that can build the model: tv = "
                          "torchvision memory_efficient=True, timm = set_grad_checkpointing(), tv-plain = "
                          "torchvision memory_efficient=False)")
    run.add_argument("--batch-size", type=positive_int, default=64, help="inputs per step (default 64)")
    size = run.add_mutually_exclusive_group()
    size.add_argument("--img-size", type=positive_int, nargs="+", metavar="N",
                      help="input size: one number (the edge: a square, or a cube with --spatial-dims 3), H W, "
                           "or D H W for a 3D input (default: 32 for small-input nets, else 224)")
    size.add_argument("--volume", type=positive_int, metavar="N", help="a 3D input of NxNxN (same as --img-size N N N)")
    run.add_argument("--amp", choices=AMP_NAMES, help="autocast dtype (default: none)")
    run.add_argument("--dtype", choices=DTYPE_NAMES, default="fp32",
                     help="the parameters' and the input's dtype (default fp32)")
    run.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd",
                     help="the update whose state the step holds: sgd (none), sgd-momentum (one buffer per "
                          "parameter), adamw (two), none (no update, as bench's step). Default: sgd")
    run.add_argument("--budget", type=_BudgetType(),
                     help=f"memory to fit: a size (24GiB; units are binary, 80GB = 80GiB as GPUs are labelled; 12e9 is "
                          f"bytes) or a GPU preset: "
                          f"{', '.join(GPU_PRESETS)}. Without it only the peak at --batch-size is predicted")
    run.add_argument("--device", choices=DEVICES,
                     help="what the step runs on, whose kernels' scratch is counted: cuda or cpu (at --threads). "
                          "Default: cuda; with --check, this machine's GPU if torch sees one, else its CPU")
    run.add_argument("--margin", type=_margin,
                     help="fraction of the budget held back for what the prediction does not count (default: "
                          + ", ".join(f"{m:g} on {d}" for d, m in DEFAULT_MARGINS.items()) + ")")
    run.add_argument("--check", type=positive_int, nargs="?", const=2, metavar="N",
                     help="run one real step of each variant at batch N (default 2) on this machine's GPU, else its "
                          "CPU, and print the predicted peak against the allocator's")
    run.add_argument("--max-edge", action="store_true",
                     help="also search the largest square/cube edge at --batch-size (always on for 3D inputs)")
    run.add_argument("--threads", type=thread_count, help="torch CPU threads (default: torch's choice)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write every predicted figure to FILE (schema effidense.plan/1, "
                                                    "see docs/planner.md)")
    out.add_argument("--plot", metavar="FILE", help="plot predicted peak against batch (.png, .pdf or .svg; needs "
                                                    "matplotlib)")
    out.add_argument("--force", action="store_true", help="overwrite existing --json/--plot files")
    out.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _input_size(args: argparse.Namespace, spec: ModelSpec) -> int | list[int] | None:
    """--img-size or --volume as plan() takes them. One number is an edge: a square, a cube or a length, as the
    model's spatial dims say (a 3D model is used on cubes). Two or three numbers are the input's own size, which
    makes a named model 2D or 3D; one whose dims were given (--spatial-dims, --model-kwargs) must agree."""
    if args.volume is not None:
        return [args.volume] * 3
    if args.img_size is None or len(args.img_size) == 1:
        return None if args.img_size is None else args.img_size[0]
    from ..modelspec import dims_of_size

    chosen = "spatial_dims" in spec.kwargs
    dims_of_size(args.img_size, spec.arg("spatial_dims"), chosen, img_size_flag(args.img_size))
    return list(args.img_size)


def _built_size(args: argparse.Namespace) -> tuple[list[int], int]:
    """The input size and spatial dims of a model planned as its own class builds it: --volume, or --img-size (one
    edge, or the input's own sizes, which choose the dims), or 224 in 2D."""
    size = [args.volume] * 3 if args.volume is not None else list(args.img_size or [224])
    if len(size) == 1:
        return size * (args.spatial_dims or 2), args.spatial_dims or 2
    from ..modelspec import dims_of_size

    return size, dims_of_size(size, args.spatial_dims or 2, args.spatial_dims is not None, img_size_flag(size))


def _segmentation(args: argparse.Namespace) -> dict[str, Any]:
    """plan()'s arguments for an FC-DenseNet: its variants, name, channels, classes and input size."""
    kwargs = segmentation_kwargs(args)
    size, dims = _built_size(args)
    in_chans = 3 if args.in_chans is None else args.in_chans
    classes = 11 if args.num_classes is None else args.num_classes
    from ..harness.tiramisu import segmentation_variants

    builders, min_size = segmentation_variants(args.model, dims, in_chans, classes, **kwargs)
    return {"model": builders, "name": args.model, "in_chans": in_chans, "num_classes": classes,
            "min_size": min_size, "img_size": size}


def _monai(args: argparse.Namespace) -> dict[str, Any]:
    """plan()'s arguments for MONAI's name: effidense.monai's drop-in in each mode and MONAI's own class."""
    unused = [f"--{key.replace('_', '-')}" for key in ("growth_rate", "block_config", "num_init_features", "bn_size",
                                                       "compression", "drop_rate", "small_inputs")
              if getattr(args, key) is not None]
    if unused:
        raise ValueError(f"{', '.join(unused)} do not apply to {args.model}; give MONAI's arguments with "
                         "--model-kwargs (e.g. init_features=32 growth_rate=16 norm=instance)")
    size, dims = _built_size(args)
    in_chans = 1 if args.in_chans is None else args.in_chans
    classes = 2 if args.num_classes is None else args.num_classes
    from ..harness import monai_variants

    builders, min_size = monai_variants(args.model, dims, in_chans, classes, **args.model_kwargs)
    return {"model": builders, "name": f"{args.model} (effidense.monai, {dims}D)", "in_chans": in_chans,
            "num_classes": classes, "min_size": min_size, "img_size": size}


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    known = [*model_names(), *SEGMENTATION_MODELS, *MONAI_MODELS]
    if args.model not in known:  # refused before torch loads
        parser.error(unknown_model_message(args.model, known))
    if problem := img_size_problem(args.img_size):
        parser.error(problem)
    if args.volume is not None and args.spatial_dims not in (None, 3):
        parser.error(f"--volume {args.volume} is a 3D input but --spatial-dims is {args.spatial_dims}")
    if args.check is not None and args.budget is not None:
        parser.error("--check measures one step at its own batch; plan the largest batch without it (drop --budget)")
    # torch, torchvision and timm load here, once the arguments are known to be good
    from ..fileio import outputs_problem, short_error
    from ..harness import torch_threads
    from ..modelspec import resolve_model
    from ..planner import BudgetError, format_check, format_table, plan, recommendation, write_json, write_plot

    problem = outputs_problem(args.json, args.plot, args.force)
    if problem:
        parser.error(problem)

    def progress(name: str) -> None:
        if not args.quiet:
            print(f"plan: {name}", file=sys.stderr, flush=True)

    try:
        named = False
        if args.model in SEGMENTATION_MODELS:
            model = _segmentation(args)
        elif args.model in MONAI_MODELS:
            model = _monai(args)
        else:
            spec = spec_from_args(args)
            model = {"model": spec, "img_size": _input_size(args, spec)}
            # a name the train command builds as planned: no flag changed it, and images, not volumes
            named = args.model != "custom" and spec == resolve_model(args.model) and spec.arg("spatial_dims") == 2 \
                and not isinstance(model["img_size"], list)
        device = args.device or "cuda"
        if args.check is not None and args.device is None:
            import torch  # the device this machine would measure on

            device = "cuda" if torch.cuda.is_available() else "cpu"
        with torch_threads(args.threads):
            report = plan(**model, variants=args.variants,
                          batch_size=args.batch_size if args.check is None else args.check,
                          amp=args.amp, dtype=args.dtype, optimizer=args.optimizer, budget=args.budget,
                          margin=args.margin, max_edge=True if args.max_edge else None, progress=progress,
                          device=device, measure=args.check is not None, workers=None,
                          line=args.plot is not None)
    except BudgetError as e:
        return _error(f"--budget: {e}")
    except ValueError as e:
        return _error(str(e))
    print(format_check(report) if args.check is not None else format_table(report))
    status = 0
    for r in report.variants:
        if r.status == "does-not-fit":
            print(f"{PROG}: {r.name} {r.error}", file=sys.stderr)
        elif r.status == "failed":
            print(f"{PROG}: {r.name} failed: {r.error}", file=sys.stderr)
    if not any(r.ok for r in report.variants):
        print(f"{PROG}: error: no variant fits or runs (see above)", file=sys.stderr)
        status = 1
    for flag, path, write in (("--json", args.json, write_json), ("--plot", args.plot, write_plot)):
        if path is None:
            continue
        try:
            write(path, report)
        except OSError as e:
            print(f"{PROG}: error: {flag}: cannot write {path}: {short_error(e)}", file=sys.stderr)
            status = 1
            continue
        print(f"wrote {path}")
    if args.check is None:
        line = recommendation(report, args.model if named else None)
        if line:
            print(line)
    return status


if __name__ == "__main__":
    sys.exit(main())
