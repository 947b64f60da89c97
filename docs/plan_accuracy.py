"""The planner's predicted peak against the CPU allocator's, over memory modes, peers, sizes and optimizers.

Each case plans DenseNet-121 on the CPU (``plan(..., device="cpu", measure=True)``: the prediction on fake tensors
with the CPU's kernel scratch, then one real step of each variant measured by ``effidense.memory.cpu_peak_bytes``)
and prints a markdown row per case: (predicted - measured) / measured per variant. docs/planner.md holds the table.

    python docs/plan_accuracy.py [--threads 1] [--quick]
"""
from __future__ import annotations

import argparse
import time

import torch

from effidense.modelspec import resolve_model
from effidense.planner import plan

VARIANTS_2D = "plain,efficient,frugal,tv,timm,tv-plain"
VARIANTS_3D = "plain,efficient,frugal,monai"
# (spatial dims, edge, batch): 2D images with 3 channels and 1000 classes; 3D volumes with 1 channel and 2 classes
CASES = [(2, 64, 4), (2, 112, 4), (2, 224, 2), (3, 32, 2), (3, 48, 2), (3, 96, 1)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--optimizers", default="sgd,adamw")
    parser.add_argument("--quick", action="store_true", help="the two smallest cases only")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {args.threads} thread(s), fp32\n")
    print("| case | optimizer | " + " | ".join(VARIANTS_2D.split(",")) + " | monai | largest miss |")
    print("|---|---|" + "---|" * 8)
    worst = 0.0
    for dims, edge, batch in CASES[:2] if args.quick else CASES:
        for optimizer in args.optimizers.split(","):
            start = time.perf_counter()
            spec = resolve_model("densenet121", {"spatial_dims": 3, "in_chans": 1, "num_classes": 2}
                                 if dims == 3 else {})
            report = plan(spec, variants=VARIANTS_2D if dims == 2 else VARIANTS_3D, img_size=edge, batch_size=batch,
                          optimizer=optimizer, device="cpu", measure=True)
            errors = {r.name: r.measured_error for r in report.variants}
            cells = [f"{errors[v]:+.2%}" if errors.get(v) is not None else "-"
                     for v in [*VARIANTS_2D.split(","), "monai"]]
            miss = max(abs(e) for e in errors.values() if e is not None)
            worst = max(worst, miss)
            size = "x".join([str(edge)] * dims)
            print(f"| DenseNet-121 {dims}D {size}, batch {batch} | {optimizer} | " + " | ".join(cells)
                  + f" | {miss:.2%} ({time.perf_counter() - start:.0f} s) |", flush=True)
    print(f"\nlargest miss over all cases: {worst:.2%}")


if __name__ == "__main__":
    main()
