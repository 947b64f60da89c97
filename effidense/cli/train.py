"""Train timm models, effidense's effi_* DenseNets included.

Built-in mode (no timm checkout needed), single process or `torchrun --nproc_per_node N tools/train.py ...`:

    python tools/train.py --data-dir DIR --model effi_densenet121 -b 64 --epochs 90 --sched multistep \
        --decay-milestones 30 60 --lr 0.1 --weight-decay 1e-4 --experiment dn121

timm's own scripts (train.py, validate.py, ...) with effidense's models registered: `effidense timm SCRIPT ARGS`.

`--help` lists the built-in trainer's flags; see README.md, section "Training".
"""
from __future__ import annotations

import sys
from collections.abc import Sequence

from effidense.train import TrainError, parse_args, train


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        result = train(parse_args(argv))
    except TrainError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    if result["rank"] == 0 and result["best_metric"] is not None:
        print(f"done: best {result['best_metric']:.4f} at epoch {result['best_epoch'] + 1}, "
              f"checkpoints in {result['output_dir']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
