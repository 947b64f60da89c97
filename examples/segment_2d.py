"""Segment discs and squares in noisy images with a 2D FC-DenseNet ("Tiramisu"), in plain PyTorch.

Three classes per pixel (background, disc, square), so the network must see a shape's outline to tell its class.
The images are generated (no download). Cross-entropy training, per-class Dice on validation images. Run::

    python examples/segment_2d.py                                   # a small FC-DenseNet: seconds on a CPU
    python examples/segment_2d.py --model fcdensenet103 --size 224 --memory frugal   # the paper's model (a GPU)
"""
from __future__ import annotations

import argparse
import sys
import time
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

import effidense
from effidense import FCDenseNet

CLASSES = ("background", "disc", "square")
SMALL = dict(down_blocks=(2, 2, 2), up_blocks=(2, 2, 2), bottleneck_layers=2, growth_rate=8, init_features=16,
             drop_rate=0.0)


def make_image(size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A noisy grey ``size``^2 image with 1 to 3 discs and squares of the same brightness, and its label map."""
    yx = np.stack(np.meshgrid(np.arange(size), np.arange(size), indexing="ij"), -1)
    label = np.zeros((size, size), dtype=np.int64)
    for _ in range(rng.integers(1, 4)):
        shape = rng.integers(1, 3)
        radius = rng.uniform(size / 10, size / 6)
        center = rng.uniform(radius, size - radius, 2)
        d = yx - center
        inside = np.hypot(*d.transpose(2, 0, 1)) <= radius if shape == 1 else np.abs(d).max(-1) <= radius * 0.886
        label[inside] = shape
    image = (label > 0) + rng.normal(0, 0.3, label.shape)
    return image[None].astype(np.float32), label


def make_data(count: int, size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(seed)
    images, labels = zip(*(make_image(size, rng) for _ in range(count)), strict=True)
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(labels))


def dice(pred: torch.Tensor, label: torch.Tensor) -> float:
    """Mean Dice of the foreground classes present."""
    scores = []
    for c in range(1, len(CLASSES)):
        p, t = pred == c, label == c
        if t.any() or p.any():
            scores.append((2 * (p & t).sum() / (p.sum() + t.sum())).item())
    return float(np.mean(scores))


def train(args: argparse.Namespace, log: Any = print) -> float:
    """Train as asked; returns the last epoch's validation Dice."""
    torch.manual_seed(args.seed)
    device = torch.device(args.device)
    x, y = make_data(args.count, args.size, args.seed)
    n_val = max(1, args.count // 4)
    if args.model == "small":
        model = FCDenseNet(spatial_dims=2, in_channels=1, out_channels=3, memory=args.memory, **SMALL)
    else:
        model = getattr(effidense, args.model)(spatial_dims=2, in_channels=1, out_channels=3, memory=args.memory)
    model.to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    score = 0.0
    for epoch in range(1, args.epochs + 1):
        start, total = time.perf_counter(), 0.0
        order = torch.randperm(args.count - n_val) + n_val
        for batch in order.split(args.batch_size):
            optimizer.zero_grad()
            loss = F.cross_entropy(model(x[batch].to(device)), y[batch].to(device))
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        model.eval()
        with torch.no_grad():
            pred = torch.cat([model(xb.to(device)).argmax(1).cpu() for xb in x[:n_val].split(args.batch_size)])
        model.train()
        score = dice(pred, y[:n_val])
        log(f"epoch {epoch}: loss {total / (args.count - n_val):.4f}, val Dice {score:.4f} "
            f"({time.perf_counter() - start:.1f} s)")
    return score


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="small", choices=("small", "fcdensenet56", "fcdensenet67", "fcdensenet103"))
    parser.add_argument("--memory", default="efficient", choices=("plain", "efficient", "frugal"))
    parser.add_argument("--size", type=int, default=48, help="image edge (at least 2 ** number of down blocks)")
    parser.add_argument("--count", type=int, default=96, help="images generated (a quarter for validation)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for name in ("size", "count", "epochs", "batch_size"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    print(f"final val Dice {train(parse_args(argv)):.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
