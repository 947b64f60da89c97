"""The peak and the time of one training step, by memory mode and backward slices, beside torchvision's DenseNet.

Each variant of DenseNet-121 (or, with ``--model fcdensenet56``, of FC-DenseNet56, 11 classes, labels per position) is
built once on the CPU with the same weights. Its peak is the CPU allocator's
(``StepProbe.allocator_peak``: torch.profiler's memory events, plus the parameters, gradients and batch that live
through the step). Its time is the one training step's (SGD), the variants run in turns for ``--rounds`` rounds after
a warm-up, and each is given as the median over rounds of its step over plain's in the same round. docs/benchmarks.md
holds the table.

    python docs/sliced_backward.py [--model densenet121] [--img-size 224] [--batch-size 8] [--rounds 5] [--threads 1]
        [--variants "LABEL;LABEL..."]

"frugal, last layer apart" runs each block's last layer apart from the transition after it, as frugal does where the
layer's features do not outweigh the gradients: beside "frugal ('auto')", at a batch large enough for frugal to run them
together (DenseNet-121 at 224 px: from about 80 images in fp32), it shows what that buys and costs.
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import time
from collections.abc import Iterator

import torch

import effidense
from effidense.densenet import Transition
from effidense.harness.footprint import StepProbe, StepSpec
from effidense.harness.step import training_step
from effidense.harness.variants import build_variant
from effidense.modelspec import resolve_model

# (label, variant, backward_slices): None never slices, 'auto' slices frugal's large reruns, a number slices any
VARIANTS = [("torchvision plain", "tv-plain", None), ("torchvision memory_efficient", "tv", None),
            ("plain", "plain", None), ("efficient", "efficient", None), ("efficient, 8 slices", "efficient", 8),
            ("frugal, not sliced", "frugal", None), ("frugal ('auto')", "frugal", "auto"),
            ("frugal, last layer apart", "frugal", "auto")]
APART = "frugal, last layer apart"
# FC-DenseNet's layers have no bottleneck: 'auto' slices efficient's large reruns as frugal's
FC_VARIANTS = [("plain", "plain", None), ("efficient, not sliced", "efficient", None),
               ("efficient ('auto')", "efficient", "auto"), ("frugal ('auto')", "frugal", "auto")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=["densenet121", "fcdensenet56"], default="densenet121")
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--variants", help="labels to run, separated by ';' (default: all of the model's)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    fc = args.model == "fcdensenet56"
    spec, classes = (None, 11) if fc else (resolve_model("densenet121", {}), 1000)
    size = (args.img_size, args.img_size)
    state = None
    probes = {}
    variants = FC_VARIANTS if fc else VARIANTS
    if args.variants:
        wanted = args.variants.split(";")
        unknown = sorted(set(wanted) - {label for label, _, _ in variants})
        if unknown:
            parser.error(f"unknown variant(s) {unknown}; choose from {[label for label, _, _ in variants]}")
        variants = [v for v in variants if v[0] in wanted]
    for label, variant, slices in variants:
        def build(variant: str = variant, slices: object = slices) -> torch.nn.Module:
            model = effidense.fcdensenet56(out_channels=classes, memory=variant) if fc else build_variant(variant, spec)
            if slices is not None or variant in ("efficient", "frugal"):
                model.backward_slices = slices
            return model
        torch.manual_seed(0)
        probe = StepProbe(build, StepSpec(num_classes=classes), fake=False)
        state = state or probe.model.state_dict()
        probe.model.load_state_dict(state)
        probes[label] = probe
    print(f"torch {torch.__version__}, {args.threads} thread(s), {args.model}, {args.img_size} px, "
          f"batch {args.batch_size}, fp32, SGD\n", flush=True)
    peaks = {}
    for label, probe in probes.items():
        with apart(label == APART):
            peaks[label] = probe.allocator_peak(args.batch_size, size)
    torch.manual_seed(0)
    x = torch.randn(args.batch_size, 3, *size)
    y = torch.randint(0, classes, (args.batch_size,))
    times: dict[str, list[float]] = {label: [] for label in probes}
    for round_ in range(args.rounds + 1):
        for label, probe in probes.items():
            with apart(label == APART):
                start = time.perf_counter()
                training_step(probe.model, x, y, optimizer=probe.optimizer)
            if round_:  # the first round warms up
                times[label].append(time.perf_counter() - start)
    base = "plain" if "plain" in probes else next(iter(probes))
    print(f"| variant | peak (allocator) | step vs {base} (median of rounds) |\n|---|---|---|")
    for label in probes:
        ratio = statistics.median(t / p for t, p in zip(times[label], times[base], strict=True))
        print(f"| {label} | {peaks[label] / 2**20:.1f} MiB | {ratio:.2f}x |")


@contextlib.contextmanager
def apart(enabled: bool) -> Iterator[None]:
    """While enabled, every transition runs apart from the layer before it (DenseNet's own choice otherwise)."""
    frees_after = Transition.frees_after
    if enabled:
        Transition.frees_after = lambda *args: False
    try:
        yield
    finally:
        Transition.frees_after = frees_after


if __name__ == "__main__":
    main()
