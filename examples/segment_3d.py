"""Segment spheres in noisy volumes with a 3D FC-DenseNet ("Tiramisu"), memory-efficiently, with MONAI's tools.

A segmentation user's loop: MONAI's ``Dataset``/``DataLoader`` and dictionary transforms (intensity scaling, random
flips and rotations), ``DiceLoss`` on softmax outputs, ``DiceMetric`` on the arg-max, validation each epoch. The
model is effidense's::

    from effidense import FCDenseNet
    model = FCDenseNet(spatial_dims=3, in_channels=1, out_channels=2, memory="efficient")

The volumes are generated (no download): 1 to 3 balls of random radius in a noisy ``--size``^3 volume, the label
being the balls. Run::

    python examples/segment_3d.py --tiny                          # about a minute on a CPU: val Dice 0.94
    python examples/segment_3d.py --model fcdensenet103 --size 64 --memory frugal  # the paper's model (use a GPU)

``--tiny`` passes a small network (3 blocks of 2 layers, growth 8) so that it trains in a minute on a CPU. Needs MONAI
(``pip install monai``).
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, Dataset, decollate_batch
from monai.losses import DiceLoss
from monai.metrics import DiceMetric
from monai.transforms import AsDiscrete, Compose, EnsureChannelFirstd, RandFlipd, RandRotate90d, ScaleIntensityd
from monai.utils import set_determinism

import effidense
from effidense import FCDenseNet

TINY = dict(down_blocks=(2, 2, 2), up_blocks=(2, 2, 2), bottleneck_layers=2, growth_rate=8, init_features=16,
            drop_rate=0.0)


def make_volume(size: int, rng: np.random.Generator) -> dict[str, np.ndarray]:
    """A noisy ``size``^3 volume holding 1 to 3 balls, and their mask."""
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1)
    label = np.zeros((size,) * 3, dtype=bool)
    for _ in range(rng.integers(1, 4)):
        radius = rng.uniform(size / 8, size / 4)
        center = rng.uniform(radius, size - radius, 3)
        label |= np.linalg.norm(grid - center, axis=-1) <= radius
    image = label * rng.uniform(0.5, 1.0) + rng.normal(0, 0.35, label.shape)
    return {"image": image.astype(np.float32), "label": label.astype(np.float32)}


def make_loaders(count: int, size: int, batch_size: int, seed: int) -> tuple[DataLoader, DataLoader]:
    rng = np.random.default_rng(seed)
    data = [make_volume(size, rng) for _ in range(count)]
    n_val = max(1, count // 4)
    first = [EnsureChannelFirstd(keys=["image", "label"], channel_dim="no_channel"), ScaleIntensityd(keys="image")]
    train = Compose([*first, RandFlipd(keys=["image", "label"], prob=0.5, spatial_axis=0),
                     RandRotate90d(keys=["image", "label"], prob=0.5, spatial_axes=(1, 2))])
    return (DataLoader(Dataset(data[n_val:], train), batch_size=batch_size, shuffle=True, num_workers=0),
            DataLoader(Dataset(data[:n_val], Compose(first)), batch_size=batch_size, num_workers=0))


def build_model(args: argparse.Namespace) -> FCDenseNet:
    if args.tiny:
        return FCDenseNet(spatial_dims=3, in_channels=1, out_channels=2, memory=args.memory, **TINY)
    return getattr(effidense, args.model)(spatial_dims=3, in_channels=1, out_channels=2, memory=args.memory)


def validate(model: FCDenseNet, loader: DataLoader, device: torch.device) -> float:
    """Mean Dice of the balls (background excluded) over the validation volumes."""
    metric = DiceMetric(include_background=False, reduction="mean")
    discrete, onehot = AsDiscrete(argmax=True, to_onehot=2), AsDiscrete(to_onehot=2)
    model.eval()
    with torch.no_grad():
        for batch in loader:
            logits = model(batch["image"].to(device))
            metric([discrete(p) for p in decollate_batch(logits)],
                   [onehot(y) for y in decollate_batch(batch["label"].to(device))])
    model.train()
    return metric.aggregate().item()


def train(args: argparse.Namespace, log: Any = print) -> float:
    """Train as asked; returns the last epoch's validation Dice."""
    set_determinism(seed=args.seed)
    device = torch.device(args.device)
    train_loader, val_loader = make_loaders(args.count, args.size, args.batch_size, args.seed)
    model = build_model(args).to(device)
    loss_fn = DiceLoss(to_onehot_y=True, softmax=True, include_background=False)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    dice = 0.0
    for epoch in range(1, args.epochs + 1):
        start, total = time.perf_counter(), 0.0
        for batch in train_loader:
            optimizer.zero_grad()
            loss = loss_fn(model(batch["image"].to(device)), batch["label"].to(device))
            loss.backward()
            optimizer.step()
            total += loss.item()
        dice = validate(model, val_loader, device)
        log(f"epoch {epoch}: loss {total / len(train_loader):.4f}, val Dice {dice:.4f} "
            f"({time.perf_counter() - start:.1f} s)")
    return dice


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="fcdensenet56", choices=("fcdensenet56", "fcdensenet67", "fcdensenet103"))
    parser.add_argument("--tiny", action="store_true", help="a small FC-DenseNet that trains in a minute on a CPU")
    parser.add_argument("--memory", default="efficient", choices=("plain", "efficient", "frugal"))
    parser.add_argument("--size", type=int, default=24, help="volume edge (at least 2 ** number of down blocks)")
    parser.add_argument("--count", type=int, default=24, help="volumes generated (a quarter for validation)")
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for name in ("size", "count", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    dice = train(parse_args(argv))
    print(f"final val Dice {dice:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
