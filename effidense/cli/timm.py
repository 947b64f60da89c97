"""``effidense timm PATH/TO/{train,validate,benchmark,inference}.py ARGS...``: run one of timm's own scripts with
effidense's ``effi_*`` models registered.

The timm wheel ships none of these scripts (they live in the timm git repository); this imports effidense, then runs
the script as ``__main__`` with ``ARGS`` unchanged, exactly as ``python SCRIPT ARGS`` would (also under ``torchrun``).
This is effidense's one route to timm's scripts; timm's ``train.py`` also takes its own
``--device-modules effidense``.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

USAGE = ("usage: effidense timm PATH/TO/{train,validate,benchmark,inference}.py [ARGS...]\n\n"
         "Imports effidense (registering its effi_* models with timm), then runs the given script from a timm "
         "checkout\n(https://github.com/huggingface/pytorch-image-models) as __main__ with ARGS unchanged, e.g.\n"
         "  effidense timm ~/timm/validate.py --data-dir /data/imagenet --model effi_densenet121 --checkpoint W\n"
         "  torchrun --nproc_per_node 8 -m effidense timm ~/timm/train.py --data-dir /data/imagenet "
         "--model effi_densenet121")


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0 if argv else 2
    script, rest = argv[0], argv[1:]
    if not script.endswith(".py"):
        print(f"error: effidense timm {script}: expected the path of one of timm's scripts (train.py, validate.py, "
              "benchmark.py, inference.py) first", file=sys.stderr)
        return 2
    from effidense.train import TrainError, run_timm_script  # torch and timm: after --help

    try:
        return run_timm_script(script, rest)
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
