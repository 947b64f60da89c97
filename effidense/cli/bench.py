"""Benchmark effidense's memory modes side by side with their compiled versions and torchvision's/timm's DenseNets.

Prints a markdown table (forward/backward/step time, images/s, activation memory, host time per step at a tiny input
and, on a GPU, peak memory and the largest trainable batch), optionally writes every number to JSON and a plot of
activation memory against depth. Defaults run a training-sized step of DenseNet-BC-100 (k=12): 32x32, batch 64, on
the CPU in under a minute on 2 idle cores.
Examples:

  python tools/bench.py
  python tools/bench.py --model effi_densenet121 --batch-size 8 --variants plain,efficient,frugal,tv,timm,tv-plain
  python tools/bench.py --model effi_densenet121 --host-only --steps 20
  python tools/bench.py --device cuda --model effi_densenet121 --batch-size 64 --amp bf16 --compile --max-batch
  torchrun --nproc_per_node 4 tools/bench.py --device cuda --model effi_densenet121 --batch-size 64
"""
from __future__ import annotations

import argparse
import sys
from collections.abc import Callable

import torch

import effidense.registry  # noqa: F401 - registers the effi_* timm models
from effidense.benchmark import COMPILE_MODES, BenchConfig, BenchReport, benchmark, format_table, write_json, write_plot
from effidense.cli.flags import (
    OneLineParser,
    add_model_arguments,
    float_list,
    non_negative_int,
    positive_int,
    seed,
    spec_from_args,
    thread_count,
)
from effidense.densenet import MEMORY_MODES
from effidense.failures import is_oom
from effidense.fileio import outputs_problem, short_error
from effidense.harness import AMP_DTYPES, PEERS, parse_variants, peer_unsupported
from effidense.modelspec import resolve_model

DEFAULT_MODEL = "effi_densenet_bc100_k12"
# (batch size, warm-up steps, timed rounds) when not given. Batch 64 is a training step of the CIFAR default; on a
# CPU one warm-up and three rounds keep the default run under a minute, a GPU gets steadier medians.
DEVICE_DEFAULTS = {"cpu": (64, 1, 3), "cuda": (64, 5, 20)}
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
    run.add_argument("--compile-mode", choices=COMPILE_MODES,
                     help="torch.compile's mode for '+compile' variants (default: torch's). 'reduce-overhead' adds "
                          "CUDA graphs on a GPU; on the CPU it compiles as the default does")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    run.add_argument("--gpus", "--nproc", dest="gpus", type=positive_int, default=1, metavar="N",
                     help="DDP over N spawned processes, one per GPU (nccl); with --device cpu, N gloo processes "
                          "sharing the cores (tests the DDP path). Memory is per rank, images/s the total. "
                          "Under torchrun the process count comes from torchrun instead")
    run.add_argument("--batch-size", type=positive_int, help="images per step (per rank under DDP; default 64)")
    run.add_argument("--img-size", type=positive_int,
                     help="input height and width (default: 32 for small-input nets, else 224)")
    run.add_argument("--amp", choices=tuple(AMP_DTYPES), help="autocast dtype (default: none, fp32)")
    run.add_argument("--channels-last", action="store_true", help="channels_last memory format for model and input")
    run.add_argument("--warmup", type=non_negative_int,
                     help="untimed steps per variant first (default 1 on cpu, 5 on cuda)")
    run.add_argument("--steps", type=positive_int,
                     help="timed rounds, each one step of every variant in turn; medians are reported (default 3 "
                          "cpu, 20 cuda)")
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
                          "(the model's family, blocks scaled by --plot-scales), and step time per variant with the "
                          "spread of the rounds")
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
    try:
        write(path, report)
    except OSError as e:
        print(f"{PROG}: error: {flag}: cannot write {path}: {short_error(e)}", file=sys.stderr)
        return False
    print(f"wrote {path}")
    return True


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    problem = outputs_problem(args.json, args.plot, args.force)
    if problem:
        parser.error(problem)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    try:
        spec = spec_from_args(args)
        for scale in args.plot_scales if args.plot else ():  # the depth sweep runs last: its models are checked first
            try:
                resolve_model("custom", spec.scaled(scale).kwargs)
            except ValueError as e:
                raise ValueError(f"--plot-scales {scale:g}: {e}") from None
        if args.variants is None:
            selected = [*MEMORY_MODES, *(p for p in PEERS if peer_unsupported(spec, p) is None)]
        else:
            selected = args.variants
        variants = parse_variants(selected, compile_all=args.compile)
        batch, warmup, steps = DEVICE_DEFAULTS[args.device]
        cfg = BenchConfig(
            spec=spec, variants=variants, batch_size=batch if args.batch_size is None else args.batch_size,
            img_size=spec.default_img_size if args.img_size is None else args.img_size, device=args.device,
            amp=args.amp, channels_last=args.channels_last, warmup=warmup if args.warmup is None else args.warmup,
            steps=steps if args.steps is None else args.steps, seed=args.seed, max_batch=args.max_batch,
            max_batch_limit=args.max_batch_limit, threads=args.threads, progress=not args.quiet,
            traceback=args.traceback, host_only=args.host_only, compile_mode=args.compile_mode)
        report = benchmark(cfg, processes=args.gpus, argv=argv,
                           depth_scales=args.plot_scales if args.plot else None)
    except ValueError as e:
        return _error(str(e))
    except Exception as e:  # the run's own batch and reference model, before any variant (each reports its own)
        if not is_oom(e):
            raise
        print(f"{PROG}: error: {short_error(e, kind=True)} (a smaller --batch-size or --img-size needs less)",
              file=sys.stderr)
        return 1
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
