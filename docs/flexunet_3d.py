"""MONAI's FlexibleUNet with effidense's DenseNet-121 encoder in each memory mode, side by side on the CPU, in 3D.

Every variant starts from the same weights and runs forward and backward on the same batch (a squared-output loss,
no optimizer step). For each it prints what one forward keeps for backward (the meter,
``effidense.saved_activation_bytes``; the encoder's share in brackets), the step's peak above the model and batch
(the CPU allocator's, ``effidense.memory.cpu_peak_bytes``), whether its output and gradients are the plain encoder's,
and its step time over plain's, the variants in turns for ``--rounds`` rounds after a warm-up (medians of per-round
ratios). Where frugal's large reruns go through the batch in slices (``backward_slices='auto'``), its gradients sum
in another order: they must then differ from plain's by no more than float32's own rounding does (plain in float64
against float32). docs/segmentation.md holds the table.

    python docs/flexunet_3d.py [--volume 64] [--batch-size 2] [--rounds 3] [--threads 2]
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time

import torch
from monai.networks.nets import FlexibleUNet

import effidense
import effidense.flexunet  # noqa: F401  (registers the effi-densenet backbones)
from effidense.memory import cpu_peak_bytes

MODES = ("plain", "efficient", "frugal")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--volume", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    reference = FlexibleUNet(in_channels=1, out_channels=2, backbone="effi-densenet121", spatial_dims=3)
    models = {}
    for mode in MODES:
        models[mode] = copy.deepcopy(reference)
        models[mode].encoder.set_memory(mode)
    x = torch.randn(args.batch_size, 1, *(args.volume,) * 3)

    def step(model: torch.nn.Module, batch: torch.Tensor = x) -> tuple[torch.Tensor, list[torch.Tensor]]:
        model.zero_grad(set_to_none=True)
        out = model(batch)
        out.square().mean().backward()
        return out.detach(), [p.grad for p in model.parameters()]

    def checked(model: torch.nn.Module, batch: torch.Tensor = x) -> tuple[torch.Tensor, list[torch.Tensor]]:
        state = {k: v.clone() for k, v in model.state_dict().items()}
        result = step(model, batch)
        model.load_state_dict(state)  # the check's step leaves the running statistics as they were
        return result

    def deviation(grads: list[torch.Tensor], reference: list[torch.Tensor]) -> float:
        """The largest difference between two sets of gradients, over the largest gradient, parameter by parameter."""
        return max(float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))
                   for a, b in zip(grads, reference, strict=True))

    expected = checked(models["plain"])
    # float32's own rounding on this model: plain's gradients against the same model's in float64
    rounding = deviation(expected[1], checked(copy.deepcopy(models["plain"]).double(), x.double())[1])
    print(f"float32's own rounding: plain's gradients differ from float64's by up to {rounding:.2g} of the largest")
    for mode, model in models.items():
        out, grads = checked(model)
        off = deviation(grads, expected[1])
        saved = effidense.saved_activation_bytes(model, x)
        encoder = effidense.saved_activation_bytes(model.encoder, x)
        peak = cpu_peak_bytes(lambda model=model: step(model))
        verdict = "bitwise plain's" if off == 0 else f"gradients within {off:.2g} of plain's (sliced)"
        print(f"{mode:10s} saved {saved / 2**20:8.1f} MiB (encoder {encoder / 2**20:7.1f})  step peak "
              f"{peak / 2**20:8.1f} MiB  output {'bitwise' if torch.equal(out, expected[0]) else 'DIFFERS'}, "
              f"{verdict}", flush=True)
        if not torch.equal(out, expected[0]) or off > rounding:
            raise SystemExit(f"{mode}: its output or gradients differ from the plain encoder's by more than "
                             "float32's rounding")
    ratios: dict[str, list[float]] = {mode: [] for mode in models}
    for _ in range(args.rounds + 1):  # the first round warms up
        times = {}
        for mode, model in models.items():
            start = time.perf_counter()
            step(model)
            times[mode] = time.perf_counter() - start
        for mode in models:
            ratios[mode].append(times[mode] / times["plain"])
    for mode, values in ratios.items():
        print(f"{mode:10s} step {statistics.median(values[1:]):.2f}x plain's (median of {args.rounds} rounds)")


if __name__ == "__main__":
    main()
