"""Datasets and loaders of the built-in trainer, from timm's dataset and transform factories.

Resuming a killed run must reproduce the unbroken run exactly, so nothing about a training batch may depend on
when the loader was started: the sampler is a :class:`~torch.utils.data.DistributedSampler` (its permutation is a
function of seed and epoch) that can start part-way through an epoch, and each sample's augmentation runs with
RNGs seeded from (seed, epoch, index), whichever process loads it.

Kept rather than timm's or torchvision's versions, because those do less:

* split search: timm's ``create_dataset(..., search_split=True)`` falls back to the data root itself when no split
  folder exists (training on every image, with ``train``/``val`` taken for class names); ours refuses that in one line;
* loaders: timm's ``create_loader`` builds its own sampler and takes none, so it cannot start mid-epoch (exact resume);
* :class:`SyntheticDataset`: torchvision's ``FakeData`` draws labels independent of the image (nothing to learn, so a
  smoke run's loss cannot fall) and reseeds the global torch RNG per image.
"""
from __future__ import annotations

import argparse
import contextlib
import logging
import os
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from PIL import Image
from timm.data import create_dataset, create_transform
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..fileio import short_error
from .errors import TrainError

__all__ = ["SyntheticDataset", "ResumableSampler", "SeededSamples", "build_datasets", "check_readable",
           "set_transforms", "train_loader", "eval_loader"]

_CIFAR = {"torch/cifar10": "torch/cifar10", "cifar10": "torch/cifar10",
          "torch/cifar100": "torch/cifar100", "cifar100": "torch/cifar100"}
_FOLDER = ("", "folder", "imagefolder", "image_folder")
_VAL_NAMES = ("val", "validation", "valid", "eval", "evaluation")  # timm's synonyms
_TRAIN_NAMES = ("train", "training")


class SyntheticDataset(Dataset):
    """Deterministic random images for smoke runs: noise plus a class-dependent offset, so the loss can fall.

    ``input_size`` (C, H, W) is set once the model's data config is known.
    """

    def __init__(self, num_samples: int, num_classes: int, seed: int) -> None:
        self.num_samples, self.num_classes, self.seed = num_samples, num_classes, seed
        self.input_size: tuple[int, int, int] = (3, 32, 32)
        self.transform = None  # synthetic tensors are already normalised

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + index)
        target = index % self.num_classes
        image = torch.randn(self.input_size, generator=generator) + (2.0 * target / self.num_classes - 1.0)
        return image, target


def _find_split(root: str, split: str, synonyms: tuple[str, ...]) -> str | None:
    names = [split] + [s for s in synonyms if s != split] if split in synonyms else [split]
    for name in names:
        path = os.path.join(root, name)
        if os.path.isdir(path):
            return path
    return None


def _folder_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    root = args.data_dir
    if not root:
        raise TrainError("--data-dir is required for ImageFolder datasets (a folder holding train/ and val/)")
    if not os.path.isdir(root):
        raise TrainError(f"--data-dir {root}: no such directory")
    train_dir = _find_split(root, args.train_split, _TRAIN_NAMES)
    val_dir = _find_split(root, args.val_split, _VAL_NAMES)
    for split, path, names in (("training", train_dir, _TRAIN_NAMES), ("validation", val_dir, _VAL_NAMES)):
        if path is None:
            wanted = args.train_split if split == "training" else args.val_split
            tried = [wanted] + [n for n in names if n != wanted] if wanted in names else [wanted]
            raise TrainError(f"--data-dir {root}: no {split} split (looked for sub-folder(s) {', '.join(tried)}); "
                             "expected the ImageNet layout DIR/train/<class>/*.jpg and DIR/val/<class>/*.jpg")
    datasets = []
    class_map: dict[str, int] | None = None
    for path in (train_dir, val_dir):
        try:
            dataset = create_dataset("", root=path, search_split=False, class_map=class_map)
        except RuntimeError as e:  # timm: "Found 0 images in subfolders of ..."
            raise TrainError(f"{path}: no images found ({e})") from e
        except AssertionError as e:
            raise TrainError(f"{path}: {e}") from e
        class_to_idx = dataset.reader.class_to_idx
        if class_map is None:
            if "" in class_to_idx:  # images directly in the split folder get the empty label
                raise TrainError(f"{path}: images must sit in one sub-folder per class, not in the split folder")
            class_map = class_to_idx
        datasets.append(dataset)
    extra = _classes_in(val_dir) - set(class_map)
    if extra:
        raise TrainError(f"{val_dir}: class folder(s) {', '.join(sorted(extra))} are not in {train_dir}")
    return datasets[0], datasets[1], len(class_map)


def _classes_in(path: str) -> set[str]:
    return {entry.name for entry in os.scandir(path) if entry.is_dir()}


def _cifar_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    name = _CIFAR[args.dataset.lower()]
    if not args.data_dir:
        raise TrainError(f"--data-dir is required for {name} (the folder torchvision keeps or downloads it in)")
    if not args.dataset_download and not os.path.isdir(args.data_dir):
        raise TrainError(f"--data-dir {args.data_dir}: no such directory (pass --dataset-download to download "
                         f"{name} into it)")
    datasets = []
    for split in ("train", "test"):
        try:
            datasets.append(create_dataset(name, root=args.data_dir, split=split, download=args.dataset_download))
        except RuntimeError as e:  # torchvision: "Dataset not found or corrupted. ..."
            hint = "" if args.dataset_download else "; pass --dataset-download to download it"
            raise TrainError(f"{name} not found under {args.data_dir} ({e}){hint}") from e
    return datasets[0], datasets[1], 100 if name.endswith("100") else 10


def build_datasets(args: argparse.Namespace) -> tuple[Dataset, Dataset, int]:
    """Training and validation datasets (no transforms yet) and their number of classes.

    Runs before any model is built, so a missing or empty data directory is reported first.
    """
    name = args.dataset.lower()
    if name == "synthetic":
        num_classes = args.num_classes or 10
        if num_classes < 2:
            raise TrainError(f"--num-classes {num_classes}: a classifier needs at least two classes")
        return (SyntheticDataset(args.train_num_samples, num_classes, args.seed),
                SyntheticDataset(args.val_num_samples, num_classes, args.seed + 1), num_classes)
    if name in _CIFAR:
        train, val, num_classes = _cifar_datasets(args)
    elif name in _FOLDER:
        train, val, num_classes = _folder_datasets(args)
    else:
        raise TrainError(f"--dataset {args.dataset}: the built-in trainer reads ImageFolder directories ('' or "
                         "'folder'), torch/cifar10, torch/cifar100 and 'synthetic'; other timm datasets work in "
                         "wrapper mode (effidense timm /path/to/timm/train.py ...)")
    if num_classes < 2:  # one class: the loss is zero and the accuracy 100% whatever the model does
        raise TrainError(f"--data-dir {args.data_dir}: the training data has a single class "
                         f"({', '.join(train.reader.class_to_idx)}); a classifier needs at least two")
    if args.num_classes is not None and args.num_classes < num_classes:
        raise TrainError(f"--num-classes {args.num_classes} is smaller than the dataset's {num_classes} classes")
    return train, val, num_classes


def check_readable(dataset: Dataset, split: str) -> None:
    """Refuse, before any training, a folder dataset whose images cannot be read.

    Loads the first sample as training would: timm's dataset skips unreadable images and fails after
    ``TIMM_DATASET_MAX_RETRIES`` of them in a row. Runs under a fixed seed and restores the RNG states, so the run's
    random streams are untouched.
    """
    if not hasattr(dataset, "reader") or len(dataset) == 0:  # type: ignore[arg-type]
        return
    timm_logger = logging.getLogger("timm.data.dataset")
    disabled, timm_logger.disabled = timm_logger.disabled, True  # its per-image warnings would flood the error
    try:
        with _rng_seeded(0):
            dataset[0]
    except Exception as e:
        path = dataset.filename(0, absolute=True)  # type: ignore[attr-defined]
        try:
            with Image.open(path) as image:
                image.convert("RGB")
            detail = ""
        except Exception as first:
            detail = f"; the first, {path}: {short_error(first)}"
        raise TrainError(f"cannot read the {split} images ({short_error(e)}){detail}") from e
    finally:
        timm_logger.disabled = disabled


def set_transforms(train: Dataset, val: Dataset, data_config: dict[str, Any], args: argparse.Namespace) -> None:
    """Give both datasets timm's train/eval transforms for ``data_config`` (synthetic ones just take its size)."""
    if isinstance(train, SyntheticDataset):
        train.input_size = val.input_size = tuple(data_config["input_size"])  # type: ignore[union-attr]
        return
    common = dict(input_size=data_config["input_size"], interpolation=data_config["interpolation"],
                  mean=data_config["mean"], std=data_config["std"], crop_pct=data_config["crop_pct"])
    train.transform = create_transform(is_training=True, no_aug=args.no_aug, scale=tuple(args.scale),
                                       hflip=args.hflip, color_jitter=args.color_jitter, **common)
    val.transform = create_transform(is_training=False, crop_mode=data_config.get("crop_mode"), **common)


@contextlib.contextmanager
def _rng_seeded(seed: int) -> Iterator[None]:
    """Seed torch (CPU), ``random`` and numpy for the block, then put the caller's RNG states back."""
    states = torch.get_rng_state(), random.getstate(), np.random.get_state()
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)
    try:
        yield
    finally:
        torch.set_rng_state(states[0])
        random.setstate(states[1])
        np.random.set_state(states[2])


class SeededSamples(Dataset):
    """Loads ``(index, seed)`` keys from :class:`ResumableSampler`, running ``dataset[index]`` under that seed."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        with _rng_seeded(seed):
            return self.dataset[index]


class ResumableSampler(DistributedSampler):
    """DistributedSampler (also for one process) that yields ``(index, sample_seed)`` and can skip ahead.

    ``set_epoch(e)`` picks the permutation, ``skip(n)`` drops the first ``n`` samples of this rank's share, which
    a resumed run uses to continue mid-epoch. Sample seeds depend on (seed, epoch, index) only.
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, seed: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.skipped = 0

    def skip(self, num_samples: int) -> None:
        self.skipped = num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:  # type: ignore[override]
        indices = list(super().__iter__())[self.skipped:]
        for index in indices:
            seed = int(np.random.SeedSequence([self.seed, self.epoch, index]).generate_state(1)[0])
            yield index, seed

    def __len__(self) -> int:
        return self.num_samples - self.skipped


def _loader_kwargs(args: argparse.Namespace, device: torch.device) -> dict[str, Any]:
    # The loader's own generator draws the workers' base seed; keeping it off the global RNG keeps dropout's
    # random stream the same whether or not the loader was restarted (the samples are seeded separately).
    return dict(num_workers=args.workers, pin_memory=device.type == "cuda",
                generator=torch.Generator().manual_seed(args.seed), persistent_workers=False)


def train_loader(dataset: Dataset, sampler: ResumableSampler, args: argparse.Namespace,
                 device: torch.device) -> DataLoader:
    """Training batches (the last incomplete batch is dropped, as timm does)."""
    return DataLoader(SeededSamples(dataset), batch_size=args.batch_size, sampler=sampler, drop_last=True,
                      **_loader_kwargs(args, device))


def eval_loader(dataset: Dataset, rank: int, world_size: int, args: argparse.Namespace,
                device: torch.device) -> DataLoader:
    """Validation batches; each rank takes every ``world_size``-th image, so summed metrics count each once."""
    indices: list[int] = list(range(rank, len(dataset), world_size))  # type: ignore[arg-type]
    return DataLoader(dataset, batch_size=args.validation_batch_size or args.batch_size, sampler=indices,
                      drop_last=False, **_loader_kwargs(args, device))
