"""FC-DenseNet's memory, side by side with a port that concatenates as the common ones do: the meter's count, and
``effidense plan --model fcdensenet*``."""
from __future__ import annotations

import pytest
import torch
from conftest import load_tool, one_line_error

from effidense import saved_activation_bytes
from effidense.fcdensenet import FCDenseNet
from effidense.harness.tiramisu import ReferenceTiramisu

SMALL = dict(down_blocks=(3, 3, 3), up_blocks=(3, 3, 3), bottleneck_layers=3, growth_rate=8, init_features=16)
PLAN_TINY = ["--model-kwargs", "down_blocks=(1,1)", "up_blocks=(1,1)", "bottleneck_layers=1", "growth_rate=4",
             "init_features=8", "--threads", "1", "--quiet"]


@pytest.mark.parametrize("dims, size", [(2, (48, 40)), (3, (16, 16, 16))])
def test_the_meter_sees_efficient_and_frugal_keep_a_fraction_of_the_reference(dims: int, size: tuple) -> None:
    x = torch.randn(2, 1, *size)
    reference = saved_activation_bytes(ReferenceTiramisu(dims, 1, 2, **SMALL), x)
    saved = {mode: saved_activation_bytes(FCDenseNet(dims, 1, 2, **SMALL, memory=mode), x)
             for mode in ("plain", "efficient", "frugal")}
    assert saved["plain"] == reference  # plain keeps what a port keeps: every concatenation
    assert saved["efficient"] * 4 < reference
    assert saved["frugal"] < saved["efficient"]


def test_plan_compares_fcdensenet_modes_with_the_reference(capsys) -> None:
    assert load_tool("plan").main(["--model", "fcdensenet56", "--img-size", "12", "10", "--batch-size", "2",
                                   *PLAN_TINY]) == 0
    out = capsys.readouterr().out
    assert "fcdensenet56, batch 2, 12x10" in out
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert {"plain", "efficient", "frugal", "reference"} <= set(rows)


def test_plan_takes_a_volume_and_refuses_densenet_flags(capsys) -> None:
    plan = load_tool("plan").main
    assert plan(["--model", "fcdensenet56", "--volume", "8", "--in-chans", "1", "--num-classes", "2",
                 "--batch-size", "1", "--variants", "efficient", *PLAN_TINY]) == 0
    assert "8x8x8" in capsys.readouterr().out
    assert plan(["--model", "fcdensenet103", "--block-config", "2,2", "--quiet"]) == 2
    assert one_line_error(capsys.readouterr().err) == (
        "effidense plan: error: --block-config do not apply to fcdensenet103; give FCDenseNet's arguments with "
        "--model-kwargs (e.g. down_blocks=\"(2,2)\" up_blocks=\"(2,2)\" bottleneck_layers=2)")
    assert plan(["--model", "fcdensenet56", "--img-size", "16", "--quiet"]) == 2
    assert one_line_error(capsys.readouterr().err) == (
        "effidense plan: error: input 16x16 is too small for fcdensenet56: it needs at least 32x32")
