"""Train a 3D DenseNet-121 classifier with MONAI's datasets, transforms and loop, memory-efficiently.

This is MONAI's 3D classification tutorial (``3d_classification/densenet_training_array.py``: ``ImageDataset``,
``DataLoader``, ``ScaleIntensity``/``EnsureChannelFirst``/random flips, Adam and cross-entropy, validation accuracy
each epoch) with one change, the import:

    from monai.networks.nets import DenseNet121   # MONAI's
    from effidense.monai import DenseNet121       # the same model, with memory='efficient' by default

The data here are generated (no download): spheres against cubes of about the same volume, in noisy 32^3 volumes
stored as ``.npy`` (read by MONAI's ``NumpyReader``; no nibabel needed). Run::

    python examples/train_3d.py --make-data shapes --count 96      # writes shapes/train/*.npy, shapes/val/*.npy
    python examples/train_3d.py --data-dir shapes --tiny --epochs 6 --lr 3e-3
    python examples/train_3d.py --data-dir shapes --memory frugal        # the real DenseNet-121 (slow on a CPU)
    python examples/train_3d.py --data-dir shapes --reference            # MONAI's own DenseNet121, to compare

``--tiny`` keeps DenseNet121's class but passes a small network (block_config (2, 2), 8 initial features, growth 4)
so that it trains in seconds on a CPU. Needs MONAI (``pip install monai``) for the data pipeline only.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader, ImageDataset
from monai.transforms import Compose, EnsureChannelFirst, RandFlip, RandRotate90, ScaleIntensity
from monai.utils import set_determinism

from effidense.monai import DenseNet121  # was: from monai.networks.nets import DenseNet121

CLASSES = ("sphere", "cube")
TINY = dict(block_config=(2, 2), init_features=8, growth_rate=4, bn_size=2)


# --- data: spheres against cubes ---

def make_volume(shape: str, size: int, rng: np.random.Generator) -> np.ndarray:
    """A noisy ``size``^3 volume holding one sphere or one axis-aligned cube of about the same volume."""
    radius = rng.uniform(size / 6, size / 4)
    half = radius * (4 * np.pi / 3) ** (1 / 3) / 2  # a cube of the sphere's volume
    center = rng.uniform(radius + 1, size - radius - 1, 3)
    grid = np.stack(np.meshgrid(*[np.arange(size)] * 3, indexing="ij"), -1) - center
    inside = np.linalg.norm(grid, axis=-1) <= radius if shape == "sphere" else np.abs(grid).max(-1) <= half
    return (inside + rng.normal(0, 0.3, inside.shape)).astype(np.float32)


def make_data(directory: Path, count: int, size: int = 32, seed: int = 0, val_fraction: float = 1 / 3) -> None:
    """``count`` volumes, half of each shape, as ``directory/{train,val}/NNN_<shape>.npy``."""
    rng = np.random.default_rng(seed)
    n_val = int(count * val_fraction)
    for i in range(count):
        split = directory / ("val" if i < n_val else "train")
        split.mkdir(parents=True, exist_ok=True)
        shape = CLASSES[i % 2]
        np.save(split / f"{i:03d}_{shape}.npy", make_volume(shape, size, rng))


def volumes(directory: Path) -> tuple[list[str], np.ndarray]:
    files = sorted(str(p) for p in directory.glob("*.npy"))
    if not files:
        raise FileNotFoundError(f"no .npy volumes in {directory} (make some with --make-data)")
    labels = np.array([CLASSES.index(Path(f).stem.split("_", 1)[1]) for f in files], dtype=np.int64)
    return files, labels


def loaders(data_dir: Path, batch_size: int = 4) -> tuple[DataLoader, DataLoader]:
    """MONAI's tutorial pipeline: ImageDataset and DataLoader, intensity scaling, channel first, random flips."""
    train_transforms = Compose([ScaleIntensity(), EnsureChannelFirst(), RandFlip(prob=0.5, spatial_axis=0),
                                RandRotate90(prob=0.5, spatial_axes=(1, 2))])
    val_transforms = Compose([ScaleIntensity(), EnsureChannelFirst()])
    train_files, train_labels = volumes(data_dir / "train")
    val_files, val_labels = volumes(data_dir / "val")
    train_ds = ImageDataset(image_files=train_files, labels=train_labels, transform=train_transforms,
                            reader="NumpyReader")
    val_ds = ImageDataset(image_files=val_files, labels=val_labels, transform=val_transforms, reader="NumpyReader")
    return (DataLoader(train_ds, batch_size=batch_size, shuffle=True, num_workers=0),
            DataLoader(val_ds, batch_size=batch_size, num_workers=0))


# --- model and loop ---

def build_model(tiny: bool = False, memory: str = "efficient", model_class: Any = DenseNet121) -> torch.nn.Module:
    """DenseNet121 for one input channel and two classes (``model_class``: ours, or MONAI's to compare)."""
    kwargs: dict[str, Any] = dict(TINY) if tiny else {}
    if model_class is DenseNet121:
        kwargs["memory"] = memory
    return model_class(spatial_dims=3, in_channels=1, out_channels=len(CLASSES), **kwargs)


def train_epoch(model: torch.nn.Module, loader: Any, optimizer: torch.optim.Optimizer,
                loss_function: torch.nn.Module, device: torch.device, dtype: torch.dtype = torch.float32,
                max_steps: int | None = None) -> float:
    """One epoch of MONAI's tutorial loop (at most ``max_steps`` batches); the mean loss."""
    model.train()
    total, steps = 0.0, 0
    for inputs, labels in loader:
        if max_steps is not None and steps == max_steps:
            break
        inputs, labels = inputs.to(device=device, dtype=dtype), labels.to(device)
        optimizer.zero_grad()
        outputs = model(inputs)
        loss = loss_function(outputs, labels)
        loss.backward()
        optimizer.step()
        total += loss.item()
        steps += 1
    return total / max(steps, 1)


def evaluate(model: torch.nn.Module, loader: Any, device: torch.device) -> float:
    model.eval()
    correct = seen = 0
    with torch.no_grad():
        for inputs, labels in loader:
            outputs = model(inputs.to(device))
            correct += (outputs.argmax(1) == labels.to(device)).sum().item()
            seen += len(labels)
    return correct / seen


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Train and validate; returns the losses and accuracies per epoch."""
    set_determinism(seed=args.seed)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    train_loader, val_loader = loaders(Path(args.data_dir), args.batch_size)
    model_class: Any = DenseNet121
    if args.reference:
        from monai.networks.nets import DenseNet121 as model_class
    model = build_model(args.tiny, args.memory, model_class).to(device)
    optimizer = torch.optim.Adam(model.parameters(), args.lr)
    # cosine decay: BatchNorm's running statistics (used in validation) catch up with weights that settle
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.epochs)
    loss_function = torch.nn.CrossEntropyLoss()
    history: dict[str, Any] = dict(loss=[], accuracy=[], seconds=[])
    for epoch in range(args.epochs):
        start = time.perf_counter()
        loss = train_epoch(model, train_loader, optimizer, loss_function, device)
        scheduler.step()
        accuracy = evaluate(model, val_loader, device)
        history["loss"].append(loss)
        history["accuracy"].append(accuracy)
        history["seconds"].append(time.perf_counter() - start)
        print(f"epoch {epoch + 1}/{args.epochs}: loss {loss:.4f}, validation accuracy {accuracy:.3f} "
              f"({history['seconds'][-1]:.1f} s)", flush=True)
    set_determinism(seed=None)
    return history


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="See docs/3d.md for measured runs.")
    parser.add_argument("--make-data", metavar="DIR", help="write a generated spheres-vs-cubes set to DIR and exit")
    parser.add_argument("--count", type=int, default=96, help="volumes --make-data writes (a third for validation)")
    parser.add_argument("--size", type=int, default=32, help="edge of the generated volumes, in voxels")
    parser.add_argument("--data-dir", metavar="DIR", help="a set written by --make-data (DIR/train, DIR/val)")
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--lr", type=float, default=1e-4, help="Adam's learning rate (the tutorial's 1e-4)")
    parser.add_argument("--tiny", action="store_true", help="a small network, for a CPU (see the docstring)")
    parser.add_argument("--memory", choices=("plain", "efficient", "frugal"), default="efficient",
                        help="effidense's memory mode (every mode computes the same function)")
    parser.add_argument("--reference", action="store_true", help="train MONAI's own DenseNet121 instead")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if not args.make_data and not args.data_dir:
        parser.error("give --data-dir DIR (or --make-data DIR first)")
    for name in ("count", "size", "epochs", "batch_size"):
        if getattr(args, name) <= 0:
            parser.error(f"--{name.replace('_', '-')} must be positive, got {getattr(args, name)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.make_data:
        make_data(Path(args.make_data), args.count, args.size, args.seed)
        print(f"wrote {args.count} volumes of {args.size}^3 to {args.make_data}/train and {args.make_data}/val")
        return 0
    try:
        history = run(args)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"final validation accuracy {history['accuracy'][-1]:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
