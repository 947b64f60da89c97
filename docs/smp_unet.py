"""segmentation_models_pytorch's Unet (or ``--arch``) with timm's DenseNet-121 encoder and with effidense's, side by
side on the CPU.

Every variant is built with the same weights (timm's ``tu-densenet121`` checkpoint loads into
``tu-effi_densenet121`` as it is) and runs forward and backward on the same batch (a squared-output loss, no optimizer
step). DeepLabV3, DeepLabV3Plus and PAN ask the encoder for ``output_stride``, which timm's DenseNet refuses: there
effidense's plain mode is the reference that "timm's" stands for below. For each it prints what one forward keeps
for backward (the meter, ``effidense.saved_activation_bytes``), the step's peak above the model and batch (the CPU
allocator's, ``effidense.memory.cpu_peak_bytes``), and the step time, the variants in turns for ``--rounds`` rounds
after a warm-up, as the median over rounds of its time over timm's in the same round. It also checks each variant's
output and gradients against timm's: bitwise, or, where a rerun goes through the batch in slices (frugal's large
ones, under ``backward_slices='auto'``), gradients that differ from timm's by no more than float32's own rounding does
(timm's model in float64 against float32), since slices sum in another order. docs/segmentation.md holds the table.

    python docs/smp_unet.py [--arch Unet] [--img-size 256] [--batch-size 4] [--rounds 5] [--threads 2]

Needs segmentation_models_pytorch (``pip install segmentation-models-pytorch``), which effidense does not depend on.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import segmentation_models_pytorch as smp
import torch

import effidense
from effidense.memory import cpu_peak_bytes

DILATED = ("DeepLabV3", "DeepLabV3Plus", "PAN")  # the architectures that ask for output_stride
VARIANTS = [("tu-densenet121", None), ("tu-effi_densenet121", "plain"), ("tu-effi_densenet121", "efficient"),
            ("tu-effi_densenet121", "frugal")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="Unet", help="an smp architecture (default Unet)")
    parser.add_argument("--img-size", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    arch = getattr(smp, args.arch)
    variants = VARIANTS[1:] if args.arch in DILATED else VARIANTS
    reference = arch(variants[0][0], encoder_weights=None, classes=3, **({"memory": "plain"} if variants[0][1] else {}))
    models = {}
    for encoder, memory in variants:
        model = reference if variants.index((encoder, memory)) == 0 else \
            arch(encoder, encoder_weights=None, classes=3, memory=memory)
        model.load_state_dict(reference.state_dict())
        models[f"{encoder} {memory or ''}".strip()] = model.train()
    first = next(iter(models))
    theirs = "timm's" if first == "tu-densenet121" else "plain's"
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)

    def step(model: torch.nn.Module) -> None:
        model.zero_grad(set_to_none=True)
        model(x).square().mean().backward()

    def gradients(model: torch.nn.Module, batch: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(1)  # the same dropout masks (DeepLab's head) for every variant
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out.square().mean().backward()
        model.load_state_dict(state)  # the check's step leaves the running statistics as they were
        return out.detach(), [p.grad.double() for p in model.parameters()]

    def deviation(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
        """The largest difference between two sets of gradients, over the largest gradient, parameter by parameter."""
        return max(float((a - b).abs().max() / b.abs().max().clamp_min(1e-30)) for a, b in zip(grads, reference,
                                                                                               strict=True))

    # float32's own rounding on this model: timm's gradients against the same model's in float64
    exact = copy.deepcopy(reference).double()
    expected = gradients(reference, x)
    rounding = deviation(expected[1], gradients(exact, x.double())[1])
    del exact
    print(f"float32's own rounding: {theirs} gradients differ from float64's by up to {rounding:.2g} of the largest")
    for label, model in models.items():
        out, grads = gradients(model, x)
        bitwise = torch.equal(out, expected[0]) and all(torch.equal(a, b) for a, b in zip(grads, expected[1],
                                                                                         strict=True))
        off = deviation(grads, expected[1])
        saved = effidense.saved_activation_bytes(model, x)
        peak = cpu_peak_bytes(lambda model=model: step(model))
        verdict = f"bitwise {theirs}" if bitwise else f"output {theirs}, gradients within {off:.2g} of {theirs}"
        print(f"{label:32s} saved {saved / 2**20:8.1f} MiB  step peak {peak / 2**20:8.1f} MiB  {verdict}",
              flush=True)
        if not torch.equal(out, expected[0]) or off > rounding:
            raise SystemExit(f"{label}: its output or gradients differ from {first}'s by more than float32's "
                             "rounding")
    ratios: dict[str, list[float]] = {label: [] for label in models}
    for _ in range(args.rounds + 1):  # the first round warms up
        times = {}
        for label, model in models.items():
            start = time.perf_counter()
            step(model)
            times[label] = time.perf_counter() - start
        for label in models:
            ratios[label].append(times[label] / times[first])
    for label, values in ratios.items():
        print(f"{label:32s} step {statistics.median(values[1:]):.2f}x {theirs} (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
