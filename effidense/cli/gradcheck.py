"""Check that effidense's memory-efficient modes compute exactly the plain model's function, on your hardware.

Trains plain, efficient and frugal copies side by side (and compiled copies with --compile) and compares outputs,
loss, every parameter gradient and every buffer (BatchNorm running stats, num_batches_tracked exactly) after each
SGD step, in train and eval mode, under several settings (non-default running stats, dropout, BN momentum=None,
channels_last (channels_last_3d for volumes, none for signals), fp64, autocast); runs torch.autograd.gradcheck in
float64 on a tiny model in the same spatial dims (2D images, 3D volumes, 1D signals); with --nproc N (or under
torchrun) checks DistributedDataParallel gradients against single-process ones and that all ranks agree, with
--sync-bn for a model converted with nn.SyncBatchNorm.convert_sync_batchnorm.
Prints PASS/FAIL per check with the differences and tolerances; exits 0 only if every check passes.
Examples:

  python tools/gradcheck.py
  python tools/gradcheck.py --compile --nproc 2
  python tools/gradcheck.py --nproc 2 --sync-bn --skip-modes
  python tools/gradcheck.py --device cuda --model effi_densenet121 --img-size 64
  python tools/gradcheck.py --spatial-dims 3 --img-size 16
  python tools/gradcheck.py --model fcdensenet56
  python tools/gradcheck.py --model fcdensenet103 --spatial-dims 3 --img-size 32 --device cuda

--model fcdensenet56, fcdensenet67 or fcdensenet103 checks an FC-DenseNet (segmentation: a logit per class at every
position, each sample's label at all of its positions) with the same checks; its autograd gradcheck runs on a tiny
FC-DenseNet. --growth-rate, --num-init-features, --bn-size, --drop-rate, --in-chans, --num-classes and
--spatial-dims apply to it; its blocks are --model-kwargs in FCDenseNet's names, e.g. down_blocks="(2,2)"
up_blocks="(2,2)" bottleneck_layers=2.
  torchrun --nproc_per_node 2 tools/gradcheck.py --device cuda
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import TYPE_CHECKING

from ..choices import AMP_NAMES, SEGMENTATION_MODELS
from .flags import (
    OneLineParser,
    add_model_arguments,
    positive_int,
    seed,
    segmentation_spec_from_args,
    spec_from_args,
    thread_count,
)

if TYPE_CHECKING:
    from ..modelspec import ModelSpec

PROG = "effidense gradcheck"
_MODEL_FLAGS = ("model", "growth_rate", "block_config", "num_init_features", "bn_size", "compression", "drop_rate",
                "num_classes", "small_inputs")


def _shaped(spec: ModelSpec, args: argparse.Namespace) -> ModelSpec:
    """A default tiny model in the input's form that --spatial-dims and --in-chans ask for (a 3D run checks 3D
    models on volumes), named so the report says which."""
    changes = {k: v for k in ("spatial_dims", "in_chans") if (v := getattr(args, k)) is not None}
    if not changes:
        return spec
    from ..modelspec import ModelSpec

    dims = changes.get("spatial_dims", 2)
    name = spec.name if dims == 2 else f"{spec.name}, {dims}D"
    return ModelSpec(name, {**spec.kwargs, **changes})  # checked where main builds it, as every spec is


def build_parser() -> argparse.ArgumentParser:
    parser = OneLineParser(prog=PROG, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_arguments(parser, None, "two tiny DenseNets, see below")
    run = parser.add_argument_group("what to check (default model: two tiny DenseNets, one DenseNet-BC with the "
                                    "ImageNet stem and one plain DenseNet with the small-input stem; --spatial-dims "
                                    "and --in-chans apply to them too)")
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where to run (default: cpu)")
    run.add_argument("--steps", type=positive_int, default=2, help="SGD steps per comparison (default 2)")
    run.add_argument("--batch-size", type=positive_int, default=4, help="images per step (per rank for DDP; default 4)")
    run.add_argument("--img-size", type=positive_int, default=32,
                     help="input edge along every spatial dim: an image's height and width, a volume's depth too "
                          "(--spatial-dims 3), a signal's length (--spatial-dims 1); default 32")
    run.add_argument("--seed", type=seed, default=0, help="seed for weights, data and dropout (default 0)")
    run.add_argument("--compile", action="store_true",
                     help="also compare compiled copies (the whole model, model.set_compile(True)) in the fp32 "
                          "case, with a looser tolerance")
    run.add_argument("--amp", choices=AMP_NAMES, default="bf16",
                     help="autocast dtype of the autocast case (default bf16; fp16 needs a GPU)")
    run.add_argument("--nproc", type=positive_int, default=1, metavar="N",
                     help="also run the DDP checks in N spawned processes (gloo on cpu, nccl on cuda, one GPU each)")
    run.add_argument("--sync-bn", action="store_true",
                     help="DDP checks with the norms converted to nn.SyncBatchNorm: train-mode gradients and BN "
                          "buffers must then equal the full batch's in one process (needs --nproc N or torchrun)")
    run.add_argument("--threads", type=thread_count,
                     help="torch CPU threads (default: 1 for the default tiny models, which run fastest on one "
                          "thread, else torch's choice)")
    run.add_argument("--skip-modes", action="store_true", help="skip the mode-vs-plain training comparisons")
    run.add_argument("--skip-gradcheck", action="store_true", help="skip torch.autograd.gradcheck")
    out = parser.add_argument_group("output")
    out.add_argument("--json", metavar="FILE", help="also write every check and the environment to FILE")
    out.add_argument("--force", action="store_true", help="overwrite an existing --json file")
    out.add_argument("--verbose", action="store_true", help="one line per mode check too, not only the table")
    out.add_argument("--quiet", action="store_true", help="no progress bar on stderr")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    # torch loads once the arguments parse: --help and usage errors answer without it
    import torch

    from ..failures import is_oom
    from ..fileio import atomic_write_bytes, check_writable, short_error
    from ..harness import environment
    from ..harness.distributed import torchrun_world
    from ..verify import (
        TINY_BC,
        TINY_SMALL_INPUTS,
        VerifyConfig,
        checks_to_json,
        format_report,
        input_shape,
        run_ddp,
        run_local_checks,
    )

    problem = check_writable([args.json], force=args.force)  # before the checks run, not after
    if problem:
        parser.error(f"--json: {problem}")
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: torch sees no CUDA device (torch.cuda.is_available() is False)")
    launched = torchrun_world()
    threads_before = torch.get_num_threads()
    try:
        given = any(getattr(args, k) is not None for k in _MODEL_FLAGS) or args.model_kwargs
        if args.model in SEGMENTATION_MODELS:
            specs = [segmentation_spec_from_args(args)]
        else:
            specs = [spec_from_args(args)] if given else [_shaped(s, args) for s in (TINY_BC, TINY_SMALL_INPUTS)]
        for spec in specs:  # refused up front, not once per check
            smallest = spec.build().min_input_size
            if args.img_size < smallest:
                raise ValueError(f"--img-size {args.img_size}: {spec.name} needs inputs of at least "
                                 f"{input_shape(smallest, spec.arg('spatial_dims'))}")
        threads = args.threads or (None if given else 1)
        if threads is not None:
            torch.set_num_threads(threads)
        cfg = VerifyConfig(specs=specs, device=args.device, steps=args.steps, batch_size=args.batch_size,
                           img_size=args.img_size, seed=args.seed, compile=args.compile, amp=args.amp,
                           modes=not args.skip_modes, gradcheck=not args.skip_gradcheck)
        if args.amp == "fp16" and args.device == "cpu":
            raise ValueError("--amp fp16 is for GPUs; CPU autocast is checked in bf16")
        checks = []
        if args.sync_bn and launched is None and args.nproc < 2:
            raise ValueError("--sync-bn is a DDP check: pass --nproc N (N >= 2) or launch with torchrun")
        if launched is not None or args.nproc > 1:
            ddp = run_ddp(specs[0], args.device, args.nproc, args.batch_size, args.img_size, args.seed,
                          torchrun=launched, sync_bn=args.sync_bn)
            if ddp is None:  # a torchrun rank other than 0; rank 0 reports
                return 0
            checks += ddp
        checks = run_local_checks(cfg, progress=not args.quiet) + checks
    except ValueError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    except Exception as e:
        if not is_oom(e):
            raise
        print(f"{PROG}: error: {short_error(e, kind=True)} (a smaller --batch-size or --img-size needs less)",
              file=sys.stderr)
        return 1
    finally:
        torch.set_num_threads(threads_before)  # main() also runs in-process (tests)
    env = environment(args.device, argv, launched[2] if launched else max(args.nproc, 1))
    header = [f"effidense gradcheck: torch {env['torch']}, {args.device} ({env['device_name']}), {args.steps} SGD "
              f"step{'s' if args.steps > 1 else ''} (lr 0.1, momentum 0.9), batch {args.batch_size}, "
              f"{input_shape(args.img_size, specs[0].arg('spatial_dims'))}, seed {args.seed}",
              "models: " + "; ".join(s.describe() for s in specs)]
    print(format_report(checks, header, verbose=args.verbose))
    if args.json:
        try:
            atomic_write_bytes(args.json, (json.dumps(checks_to_json(checks, env), indent=2) + "\n").encode())
        except OSError as e:
            print(f"{PROG}: error: --json: cannot write {args.json}: {short_error(e)}", file=sys.stderr)
            return 1
        print(f"wrote {args.json}")
    return 0 if checks and all(c.passed for c in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
