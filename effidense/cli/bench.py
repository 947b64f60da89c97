"""Benchmark effidense's memory modes side by side with their compiled versions and torchvision's/timm's DenseNets.

Prints a markdown table (forward/backward/step time, images/s, activation memory, host time per step at a tiny input
and, on a GPU, peak memory and the largest trainable batch), optionally writes every number to JSON and a plot of
activation memory against depth. With no arguments: DenseNet-121 in every memory mode beside the peers that build it
(torchvision, timm, MONAI), one training step each at 64x64, batch 8, three timed rounds: a couple of minutes on 2
CPU cores. --full is the training-sized run (224x224, batch 64) with compiled copies, for a long run or a GPU.
Examples:

  python tools/bench.py
  python tools/bench.py --full
  python tools/bench.py --model effi_densenet_bc100_k12 --batch-size 64 --variants plain,efficient,frugal
  python tools/bench.py --model effi_densenet121 --host-only --steps 20
  python tools/bench.py --device cuda --model effi_densenet121 --batch-size 64 --amp bf16 --compile --max-batch
  torchrun --nproc_per_node 4 tools/bench.py --device cuda --model effi_densenet121 --batch-size 64

FC-DenseNet (--model fcdensenet56, 67 or 103: segmentation, a label per position) runs its memory modes beside
`reference`, a port that concatenates as the common PyTorch ports do (as plan compares them); --in-chans defaults to
3, --num-classes to 11, and its blocks are --model-kwargs in FCDenseNet's names (down_blocks="(2,2)" up_blocks="(2,2)"
bottleneck_layers=2 growth_rate=... init_features=...). Its plot has the step times alone:
  effidense bench --model fcdensenet103 --img-size 360 480 --batch-size 1
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from typing import TYPE_CHECKING

from ..choices import AMP_NAMES, COMPILE_MODES, MEMORY_MODES, PEERS, SEGMENTATION_MODELS
from .flags import (
    OneLineParser,
    add_model_arguments,
    float_list,
    img_size_flag,
    img_size_problem,
    non_negative_int,
    positive_int,
    seed,
    segmentation_spec_from_args,
    spec_from_args,
    thread_count,
)

if TYPE_CHECKING:
    from torch import nn

    from ..benchmark import BenchReport
    from ..harness.segmentation import SegmentationSpec
    from ..modelspec import ModelSpec

DEFAULT_MODEL = "effi_densenet121"  # the network every peer builds: the default run compares them all
# What a run does when not told: (input edge, batch size, warm-up steps, timed rounds); an edge of None is the
# model's own input size (224 px for ImageNet stems, 32 for CIFAR ones). On the CPU the default answers in a
# couple of minutes at 64 px, batch 8; --full runs the training-sized step of every variant, compiled copies too.
QUICK = {"cpu": (64, 8, 1, 3), "cuda": (None, 64, 5, 20)}
FULL = {"cpu": (None, 64, 1, 5), "cuda": (None, 64, 5, 20)}
PROG = "effidense bench"


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, DEFAULT_MODEL)
    run = parser.add_argument_group("what to run")
    run.add_argument("--variants",
                     help=f"comma-separated variants from {', '.join((*MEMORY_MODES, *PEERS))}, each optionally "
                          "suffixed '+compile' (default: plain,efficient,frugal plus the peers that can build the "
                          "model exactly: tv = torchvision memory_efficient=True, timm = set_grad_checkpointing(), "
                          "tv-plain = torchvision memory_efficient=False, the reference of host time)")
    run.add_argument("--compile", action="store_true",
                     help="also run a compiled copy (the whole model, torch.compile) of each selected memory mode; "
                          "each compiled variant is timed beside its eager self, with its compile time, and a line "
                          "says whether compiling pays on this device")
    run.add_argument("--full", action="store_true",
                     help="the full matrix: every variant at the model's own input size (224 px for DenseNet-121), "
                          "batch 64, 5 timed rounds on the CPU, plus a compiled copy of each memory mode (as "
                          "--compile): a long run on a CPU. Flags given alongside still win")
    run.add_argument("--compile-mode", choices=COMPILE_MODES,
                     help="torch.compile's mode for '+compile' variants (default: torch's). 'reduce-overhead' adds "
                          "CUDA graphs on a GPU; on the CPU it compiles as the default does")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    run.add_argument("--gpus", "--nproc", dest="gpus", type=positive_int, default=1, metavar="N",
                     help="DDP over N spawned processes, one per GPU (nccl); with --device cpu, N gloo processes "
                          "sharing the cores (tests the DDP path). Memory is per rank, images/s the total. "
                          "Under torchrun the process count comes from torchrun instead")
    run.add_argument("--batch-size", type=positive_int,
                     help="images per step (per rank under DDP; default 8 on cpu, 64 on cuda and with --full)")
    run.add_argument("--img-size", type=positive_int, nargs="+", metavar="N",
                     help="input size: one number (the edge: a square, or a cube with --spatial-dims 3), H W, or "
                          "D H W for a 3D input (default on cpu: 64, or 32 for small-input nets; on cuda and with "
                          "--full the model's own: 32 for small-input nets, else 224)")
    run.add_argument("--amp", choices=AMP_NAMES, help="autocast dtype (default: none, fp32)")
    run.add_argument("--channels-last", action="store_true", help="channels_last memory format for model and input")
    run.add_argument("--warmup", type=non_negative_int,
                     help="untimed steps per variant first (default 1 on cpu, 5 on cuda); a compiled variant's first "
                          "step compiles, and its cold compile time is reported")
    run.add_argument("--steps", type=positive_int,
                     help="timed rounds, each one step of every variant in turn; medians are reported (default 3 "
                          "cpu, 5 with --full, 20 cuda)")
    run.add_argument("--seed", type=seed, default=0, help="seed for weights and data (default 0)")
    run.add_argument("--threads", type=thread_count, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--max-batch", action="store_true",
                     help="GPU only: search the largest batch that trains one step without running out of memory, "
                          "per variant (doubling from --batch-size, then bisection), and its ratio to plain's")
    run.add_argument("--host-only", action="store_true",
                     help="time only the host-overhead step (batch 2 at 32x32, or the model's min_input_size): no "
                          "full-size step, no memory columns; quick, for comparing per-step overhead")
    run.add_argument("--max-batch-limit", type=positive_int, default=1 << 16,
                     help="upper end of that search (default 65536)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write every number plus the environment (versions, device, "
                                                    "date, command) to FILE")
    out.add_argument("--plot", metavar="FILE",
                     help="write a plot (.png, .pdf or .svg, by suffix; needs matplotlib, the 'plot' extra): "
                          "activation memory against depth for plain/efficient/frugal and the torchvision/timm peers "
                          "(the model's family, blocks scaled by --plot-scales; DenseNets only), and step time per "
                          "variant with the spread of the rounds")
    out.add_argument("--plot-scales", type=float_list, default=[0.25, 0.5, 1, 1.5, 2],
                     help="factors for each block's layer count in the depth sweep (default 0.25,0.5,1,1.5,2)")
    out.add_argument("--force", action="store_true", help="overwrite existing --json/--plot files")
    out.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    out.add_argument("--traceback", action="store_true", help="print the full traceback of a failing variant")
    return parser


def _error(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _write(flag: str, path: str, write: Callable[[str, BenchReport], None], report: BenchReport) -> bool:
    """Write one output; a failure (disk full, file system gone read-only) is one line, the others still run."""
    from ..fileio import short_error

    try:
        write(path, report)
    except OSError as e:
        print(f"{PROG}: error: {flag}: cannot write {path}: {short_error(e)}", file=sys.stderr)
        return False
    print(f"wrote {path}")
    return True


def _model(args: argparse.Namespace) -> tuple[ModelSpec | SegmentationSpec, dict[str, Callable[[], nn.Module]] | None]:
    """The model the flags describe, and its variants' builders where the DenseNet peers do not build it: an
    FC-DenseNet's memory modes and reference port, as plan compares them, from the spec's own arguments."""
    if args.model not in SEGMENTATION_MODELS:
        return spec_from_args(args), None
    from ..harness.tiramisu import segmentation_variants

    spec = segmentation_spec_from_args(args)
    config = {k: v for k, v in spec.kwargs.items() if k not in ("spatial_dims", "in_channels", "out_channels")}
    builders, _ = segmentation_variants(args.model, spec.arg("spatial_dims"), spec.arg("in_chans"),
                                        spec.arg("num_classes"), **config)
    return spec, builders


def _model_and_size(args: argparse.Namespace) -> tuple[ModelSpec | SegmentationSpec,
                                                        dict[str, Callable[[], nn.Module]] | None,
                                                        int | tuple[int, ...] | None]:
    """:func:`_model`, and --img-size as BenchConfig takes it: one edge, or the input's own size, which makes the
    model 3D (or 2D) unless its dims were given, when they must agree."""
    spec, builders = _model(args)
    if args.img_size is None or len(args.img_size) == 1:
        return spec, builders, None if args.img_size is None else args.img_size[0]
    from ..modelspec import dims_of_size

    size, dims = tuple(args.img_size), spec.arg("spatial_dims")
    chosen = args.spatial_dims is not None or "spatial_dims" in args.model_kwargs
    if dims_of_size(size, dims, chosen, img_size_flag(size)) != dims:
        args.spatial_dims = len(size)
        spec, builders = _model(args)
    return spec, builders, size


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if problem := img_size_problem(args.img_size):
        parser.error(problem)
    # torch and timm load once the arguments parse: --help and usage errors answer without them
    import torch

    from .. import registry  # noqa: F401 - registers the effi_* timm models
    from ..benchmark import BenchConfig, benchmark
    from ..failures import is_oom
    from ..fileio import outputs_problem, short_error
    from ..harness import parse_variants, peer_unsupported
    from ..modelspec import resolve_model

    problem = outputs_problem(args.json, args.plot, args.force)
    if problem:
        parser.error(problem)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    try:
        spec, builders, img_size = _model_and_size(args)
        # the depth sweep (a DenseNet family's) runs last: its models are checked first
        sweep = args.plot_scales if args.plot and builders is None else None
        for scale in sweep or ():
            try:
                resolve_model("custom", spec.scaled(scale).kwargs)
            except ValueError as e:
                raise ValueError(f"--plot-scales {scale:g}: {e}") from None
        if args.variants is not None:
            selected = args.variants
        elif builders is not None:
            selected = list(builders)
        else:
            selected = [*MEMORY_MODES, *(p for p in PEERS if peer_unsupported(spec, p) is None)]
        variants = parse_variants(selected, compile_all=args.compile or args.full, offered=list(builders or ()))
        edge, batch, warmup, steps = (FULL if args.full else QUICK)[args.device]
        edge = spec.default_img_size if edge is None else min(edge, spec.default_img_size)
        cfg = BenchConfig(
            spec=spec, variants=variants, batch_size=batch if args.batch_size is None else args.batch_size,
            img_size=edge if img_size is None else img_size, device=args.device,
            amp=args.amp, channels_last=args.channels_last, warmup=warmup if args.warmup is None else args.warmup,
            steps=steps if args.steps is None else args.steps, seed=args.seed, max_batch=args.max_batch,
            max_batch_limit=args.max_batch_limit, threads=args.threads, progress=not args.quiet,
            traceback=args.traceback, host_only=args.host_only, compile_mode=args.compile_mode, builders=builders)
        report = benchmark(cfg, processes=args.gpus, argv=argv, depth_scales=sweep)
    except ValueError as e:
        return _error(str(e))
    except Exception as e:  # the run's own batch and reference model, before any variant (each reports its own)
        if not is_oom(e):
            raise
        print(f"{PROG}: error: {short_error(e, kind=True)} (a smaller --batch-size or --img-size needs less)",
              file=sys.stderr)
        return 1
    return _print_report(report, args)


def _print_report(report: BenchReport | None, args: argparse.Namespace) -> int:
    from ..benchmark import format_table, write_json, write_plot

    if report is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(format_table(report))
    for error in (report.depth_sweep or {}).get("errors", []):
        print(f"depth sweep: {error}", file=sys.stderr)
    for peer, reason in (report.depth_sweep or {}).get("skipped", {}).items():
        print(f"depth sweep: {peer} left out: {reason}", file=sys.stderr)
    written = all([_write("--json", args.json, write_json, report) if args.json else True,
                   _write("--plot", args.plot, write_plot, report) if args.plot else True])
    if not report.any_ok:
        print(f"{PROG}: error: no variant ran successfully (see the table)", file=sys.stderr)
        return 1
    return 0 if written else 1


if __name__ == "__main__":
    sys.exit(main())
