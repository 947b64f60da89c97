"""Train timm models, effidense's effi_* DenseNets included.

Built-in mode (no timm checkout needed), single process or `torchrun --nproc_per_node N tools/train.py ...`:

    python tools/train.py --data-dir DIR --model effi_densenet121 -b 64 --epochs 90 --sched multistep \
        --decay-milestones 30 60 --lr 0.1 --weight-decay 1e-4 --experiment dn121
    python tools/train.py --resume output/train/dn121      # continue it, with its own arguments (args.yaml)

timm's own scripts (train.py, validate.py, ...) with effidense's models registered: `effidense timm SCRIPT ARGS`.

`--help` lists the built-in trainer's flags; see README.md, section "Training". Errors are one line, printed once under
torchrun (by rank 0, which meets the same ones); Ctrl-C finishes the file being written, then stops with one line.
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from ..train.args import parse_args
from ..train.errors import TrainError, TrainingInterrupted
from .flags import primary, report_once


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = parse_args(argv)
        from ..train.trainer import train  # torch and timm: once the arguments parse, so --help answers at once

        result = train(args)
    except TrainingInterrupted as e:
        if primary():  # Ctrl-C reaches every rank, and rank 0 alone says so
            print(e, file=sys.stderr)
        return 130
    except TrainError as e:
        report_once(f"error: {e}")
        return 1
    except KeyboardInterrupt:  # before the run directory was written
        if primary():
            print("interrupted (Ctrl-C) before training started; nothing was written", file=sys.stderr)
        return 130
    if result["rank"] == 0 and result["best_metric"] is not None:
        print(f"done: best {result['best_metric']:.4f} at epoch {result['best_epoch']} (counted from 0), "
              f"checkpoints in {result['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
