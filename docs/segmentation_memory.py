"""A segmentation network with effidense's DenseNet-121 encoder in each memory mode, side by side on the CPU:
segmentation_models_pytorch's Unet (or another ``--arch``) beside timm's own DenseNet encoder, or MONAI's
FlexibleUNet in 3D (``--arch FlexibleUNet``).

Every variant is built with the same weights (timm's ``tu-densenet121`` checkpoint loads into
``tu-effi_densenet121`` as it is) and runs forward and backward on the same batch (a squared-output loss, no optimizer
step; dropout, as DeepLab's head has, seeded alike). The reference is timm's encoder; where there is none (DeepLabV3,
DeepLabV3Plus and PAN ask for ``output_stride``, which timm's DenseNet refuses; FlexibleUNet takes effidense's
backbones only) it is effidense's plain mode. For each variant it prints what one forward keeps for backward (the
meter, ``effidense.saved_activation_bytes``; the encoder's share in brackets), the step's peak above the model and
batch (the CPU allocator's, ``effidense.memory.cpu_peak_bytes``), and its output and gradients against the
reference's: bitwise, or, where a rerun goes through the batch in slices (frugal's large ones, under
``backward_slices='auto'``), gradients that differ by no more than float32's own rounding does (the reference in
float64 against float32), since slices sum in another order. Then the step times, the variants in turns for
``--rounds`` rounds after a warm-up, as medians of per-round ratios to the reference. docs/segmentation.md holds the
tables.

    python docs/segmentation_memory.py [--arch Unet] [--size 256] [--batch-size 4] [--rounds 5] [--threads 2]
    python docs/segmentation_memory.py --arch FlexibleUNet --size 64 --batch-size 2 --rounds 3

Needs segmentation_models_pytorch (``pip install segmentation-models-pytorch``), which effidense does not depend on,
or MONAI for FlexibleUNet.
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch

import effidense
from effidense.memory import cpu_peak_bytes

DILATED = ("DeepLabV3", "DeepLabV3Plus", "PAN")  # the smp architectures that ask for output_stride
MODES = ("plain", "efficient", "frugal")


def variants(arch: str) -> tuple[dict[str, torch.nn.Module], int, int]:
    """The networks to compare, the reference first, from the same weights; their input's channels and spatial dims."""
    if arch == "FlexibleUNet":
        from monai.networks.nets import FlexibleUNet

        import effidense.flexunet  # noqa: F401  (registers the effi-densenet backbones)

        reference = FlexibleUNet(in_channels=1, out_channels=2, backbone="effi-densenet121", spatial_dims=3)
        models = {f"effi-densenet121 {mode}": copy.deepcopy(reference) for mode in MODES}
        for model, mode in zip(models.values(), MODES, strict=True):
            model.encoder.set_memory(mode)
        return models, 1, 3
    import segmentation_models_pytorch as smp

    build = getattr(smp, arch)
    models = {} if arch in DILATED else {"tu-densenet121": build("tu-densenet121", encoder_weights=None, classes=3)}
    for mode in MODES:
        models[f"tu-effi_densenet121 {mode}"] = build("tu-effi_densenet121", encoder_weights=None, classes=3,
                                                      memory=mode)
    weights = next(iter(models.values())).state_dict()
    for model in models.values():
        model.load_state_dict(weights)
    return models, 3, 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", default="Unet", help="an smp architecture (default Unet), or FlexibleUNet (MONAI's)")
    parser.add_argument("--size", type=int, default=256, help="the input's size along each spatial axis")
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    models, channels, dims = variants(args.arch)
    for model in models.values():
        model.train()
    first = next(iter(models))
    theirs = "timm's" if first == "tu-densenet121" else "plain's"
    x = torch.randn(args.batch_size, channels, *(args.size,) * dims)

    def step(model: torch.nn.Module, batch: torch.Tensor = x) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out.square().mean().backward()
        return out.detach(), [p.grad for p in model.parameters()]

    def checked(model: torch.nn.Module, batch: torch.Tensor = x) -> tuple[torch.Tensor, list[torch.Tensor]]:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        torch.manual_seed(1)  # the same dropout masks for every variant
        result = step(model, batch)
        model.load_state_dict(state)  # the check's step leaves the running statistics as they were
        return result

    def deviation(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
        """The largest difference between two sets of gradients, over the largest gradient, parameter by parameter."""
        return max(float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
                   for a, b in zip(grads, reference, strict=True))

    expected = checked(models[first])
    rounding = deviation(expected[1], checked(copy.deepcopy(models[first]).double(), x.double())[1])
    print(f"float32's own rounding: {theirs} gradients differ from float64's by up to {rounding:.2g} of the largest")
    for label, model in models.items():
        out, grads = checked(model)
        bitwise = torch.equal(out, expected[0]) and all(torch.equal(a, b) for a, b in zip(grads, expected[1],
                                                                                         strict=True))
        off = deviation(grads, expected[1])
        saved = effidense.saved_activation_bytes(model, x)
        encoder = effidense.saved_activation_bytes(model.encoder, x)
        peak = cpu_peak_bytes(lambda model=model: step(model))
        verdict = f"bitwise {theirs}" if bitwise else f"output {theirs}, gradients within {off:.2g} of {theirs}"
        print(f"{label:32s} saved {saved / 2**20:8.1f} MiB (encoder {encoder / 2**20:7.1f})  step peak "
              f"{peak / 2**20:8.1f} MiB  {verdict}", flush=True)
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
