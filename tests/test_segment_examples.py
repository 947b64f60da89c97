"""The segmentation examples learn: a 3D FC-DenseNet with MONAI's transforms, DiceLoss and DiceMetric segments
generated balls, and the 2D example generated shapes."""
from __future__ import annotations

import importlib.util

import pytest
from conftest import ROOT


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_the_3d_example_reaches_dice_0_8():
    pytest.importorskip("monai")
    example = load("segment_3d")
    lines = []
    dice = example.train(example.parse_args(["--tiny", "--device", "cpu"]), log=lines.append)
    assert dice >= 0.8, lines


@pytest.mark.slow
def test_the_2d_example_reaches_dice_0_8():
    example = load("segment_2d")
    lines = []
    dice = example.train(example.parse_args(["--device", "cpu"]), log=lines.append)
    assert dice >= 0.8, lines
