"""Benchmark effidense's memory modes side by side with their compiled versions and torchvision's/timm's DenseNets.

Prints a markdown table (forward/backward/step time, images/s, activation memory and, on a GPU, peak memory and the
largest trainable batch), optionally writes every number to JSON and a plot of activation memory against depth.
Defaults run DenseNet-BC-100 (k=12) at 32x32, batch 8, on the CPU in well under a minute on 2 idle cores.
Examples:

  python tools/bench.py
  python tools/bench.py --model effi_densenet121 --img-size 224 --variants plain,efficient,frugal,tv,timm
  python tools/bench.py --device cuda --model effi_densenet121 --batch-size 64 --amp bf16 --compile --max-batch
  torchrun --nproc_per_node 4 tools/bench.py --device cuda --model effi_densenet121 --batch-size 64
"""
from __future__ import annotations

import argparse
import os
import shlex
import sys

import effidense  # noqa: F401 - registers the effi_* timm models
from effidense.benchmark import (
    AMP_DTYPES,
    PEERS,
    BenchConfig,
    benchmark,
    format_table,
    parse_variants,
    peer_unsupported,
    write_json,
    write_plot,
)
from effidense.densenet import MEMORY_MODES
from effidense.modelspec import add_model_arguments, float_list, spec_from_args

DEFAULT_MODEL = "effi_densenet_bc100_k12"
# (batch size, warm-up steps, timed steps) when not given: small and quick on a CPU, steadier medians on a GPU.
DEVICE_DEFAULTS = {"cpu": (8, 1, 3), "cuda": (64, 5, 20)}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="effidense bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, DEFAULT_MODEL)
    run = parser.add_argument_group("what to run")
    run.add_argument("--variants",
                     help=f"comma-separated variants from {', '.join((*MEMORY_MODES, *PEERS))}, each optionally "
                          "suffixed '+compile' (default: plain,efficient,frugal plus the peers that can build the "
                          "model exactly: tv = torchvision memory_efficient=True, timm = set_grad_checkpointing())")
    run.add_argument("--compile", action="store_true",
                     help="also run a compiled copy of each selected memory mode (model.set_compile(True) where "
                          "available, else torch.compile); compile time is reported separately")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    run.add_argument("--gpus", "--nproc", dest="gpus", type=int, default=1, metavar="N",
                     help="DDP over N spawned processes, one per GPU (nccl); with --device cpu, N gloo processes "
                          "sharing the cores (tests the DDP path). Memory is per rank, images/s the total. "
                          "Under torchrun the process count comes from torchrun instead")
    run.add_argument("--batch-size", type=int, help="images per step (per rank under DDP); default 8 cpu, 64 cuda")
    run.add_argument("--img-size", type=int, help="input height and width (default: 32 for small-input nets, else 224)")
    run.add_argument("--amp", choices=tuple(AMP_DTYPES), help="autocast dtype (default: none, fp32)")
    run.add_argument("--channels-last", action="store_true", help="channels_last memory format for model and input")
    run.add_argument("--warmup", type=int, help="untimed steps per variant first (default 1 on cpu, 5 on cuda)")
    run.add_argument("--steps", type=int, help="timed rounds, each one step of every variant in turn; medians are "
                                               "reported (default 3 cpu, 20 cuda)")
    run.add_argument("--seed", type=int, default=0, help="seed for weights and data (default 0)")
    run.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    run.add_argument("--max-batch", action="store_true",
                     help="GPU only: search the largest batch that trains one step without running out of memory, "
                          "per variant (doubling from --batch-size, then bisection), and its ratio to plain's")
    run.add_argument("--max-batch-limit", type=int, default=1 << 16, help="upper end of that search (default 65536)")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="write every number plus the environment (versions, device, "
                                                    "date, command) to FILE")
    out.add_argument("--plot", metavar="FILE.png",
                     help="write a PNG: activation memory against depth for plain/efficient/frugal (the model's "
                          "family, blocks scaled by --plot-scales) and a bar chart of step time")
    out.add_argument("--plot-scales", type=float_list, default=[0.25, 0.5, 1, 1.5, 2],
                     help="factors for each block's layer count in the depth sweep (default 0.25,0.5,1,1.5,2)")
    out.add_argument("--force", action="store_true", help="overwrite existing --json/--plot files")
    out.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    out.add_argument("--traceback", action="store_true", help="print the full traceback of a failing variant")
    return parser


def _check_output(parser: argparse.ArgumentParser, flag: str, path: str | None, force: bool) -> None:
    if path is None:
        return
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        parser.error(f"{flag}: directory {directory} does not exist")
    if os.path.exists(path) and not force:
        parser.error(f"{flag}: {path} exists; pass --force to overwrite it")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    command = shlex.join(["python", "tools/bench.py", *(sys.argv[1:] if argv is None else argv)])
    _check_output(parser, "--json", args.json, args.force)
    _check_output(parser, "--plot", args.plot, args.force)
    if args.plot and not args.plot.lower().endswith(".png"):
        parser.error(f"--plot: {args.plot} must end in .png")
    try:
        spec = spec_from_args(args)
        if args.variants is None:
            selected = [*MEMORY_MODES, *(p for p in PEERS if peer_unsupported(spec, p) is None)]
        else:
            selected = args.variants
        variants = parse_variants(selected, compile_all=args.compile)
        batch, warmup, steps = DEVICE_DEFAULTS[args.device]
        cfg = BenchConfig(
            spec=spec, variants=variants, batch_size=args.batch_size or batch,
            img_size=args.img_size or spec.default_img_size, device=args.device, amp=args.amp,
            channels_last=args.channels_last, warmup=warmup if args.warmup is None else args.warmup,
            steps=args.steps or steps, seed=args.seed, max_batch=args.max_batch,
            max_batch_limit=args.max_batch_limit, threads=args.threads, progress=not args.quiet,
            traceback=args.traceback)
        report = benchmark(cfg, processes=args.gpus, command=command,
                           depth_scales=args.plot_scales if args.plot else None)
    except ValueError as e:
        print(f"bench.py: error: {e}", file=sys.stderr)
        return 2
    if report is None:  # a torchrun rank other than 0: rank 0 reports
        return 0
    print(format_table(report))
    if args.json:
        write_json(args.json, report)
        print(f"wrote {args.json}")
    for error in (report.depth_sweep or {}).get("errors", []):
        print(f"depth sweep: {error}", file=sys.stderr)
    if args.plot:
        write_plot(args.plot, report)
        print(f"wrote {args.plot}")
    if not report.any_ok:
        print("bench.py: error: no variant ran successfully (see the table)", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
