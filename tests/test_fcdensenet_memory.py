"""FC-DenseNet's memory, side by side with a port that concatenates as the common ones do: the meter's count,
``effidense plan --model fcdensenet*`` and ``effidense bench --model fcdensenet*``."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import load_tool, one_line_error

from effidense import saved_activation_bytes
from effidense.fcdensenet import FCDenseNet
from effidense.harness.tiramisu import ReferenceTiramisu

SMALL = dict(down_blocks=(3, 3, 3), up_blocks=(3, 3, 3), bottleneck_layers=3, growth_rate=8, init_features=16)
PLAN_TINY = ["--model-kwargs", "down_blocks=(1,1)", "up_blocks=(1,1)", "bottleneck_layers=1", "growth_rate=4",
             "init_features=8", "--threads", "1", "--quiet"]
BENCH_TINY = ["--model", "fcdensenet56", "--model-kwargs", "down_blocks=(2,2)", "up_blocks=(2,2)",
              "bottleneck_layers=2", "growth_rate=4", "init_features=8", "--batch-size", "2", "--warmup", "0",
              "--steps", "2", "--threads", "1", "--quiet"]


@pytest.mark.parametrize("dims, size", [(2, (48, 40)), (3, (16, 16, 16))])
def test_the_meter_sees_efficient_and_frugal_keep_a_fraction_of_the_reference(dims: int, size: tuple) -> None:
    x = torch.randn(2, 1, *size)
    reference = saved_activation_bytes(ReferenceTiramisu(dims, 1, 2, **SMALL), x)
    saved = {mode: saved_activation_bytes(FCDenseNet(dims, 1, 2, **SMALL, memory=mode), x)
             for mode in ("plain", "efficient", "frugal")}
    assert saved["plain"] == reference  # plain keeps what a port keeps: every concatenation
    assert saved["efficient"] * 4 < reference
    # Its layers have no bottleneck, so a frugal layer reruns just what an efficient one does, and neither keeps
    # its dropout's mask (drawn again in backward): both keep what they would with no dropout at all.
    assert saved["frugal"] == saved["efficient"]
    no_dropout = FCDenseNet(dims, 1, 2, **SMALL, drop_rate=0.0, memory="efficient")
    assert saved["efficient"] == saved_activation_bytes(no_dropout, x)


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


def bench_rows(out: str) -> dict[str, list[str]]:
    """The table's rows by variant, each its cells."""
    return {line.split("|")[1].strip(): [c.strip() for c in line.strip("|").split("|")]
            for line in out.splitlines() if line.startswith("| ") and not line.startswith("| variant")}


def test_bench_times_fcdensenet_modes_beside_the_reference(capsys, tmp_path) -> None:
    """By default our modes and the reference port take turns, on a label map, with the same weights: the same
    function, plain keeping what the port keeps and the others less."""
    json_path = tmp_path / "bench.json"
    assert load_tool("bench").main([*BENCH_TINY, "--img-size", "16", "12", "--json", str(json_path)]) == 0
    out = capsys.readouterr().out
    assert "model: fcdensenet56 (modified) (FC-DenseNet, blocks (2, 2) - 2 - (2, 2)" in out
    assert "batch 2, 16x12, fp32, cpu" in out
    assert list(bench_rows(out)) == ["plain", "efficient", "frugal", "reference"]
    data = json.loads(json_path.read_text())
    assert data["config"]["img_size"] == [16, 12] and data["config"]["model"]["depth"] == 16
    results = {r["variant"]: r for r in data["results"]}
    assert all(r["status"] == "ok" and r["step_ms"] > 0 and r["same_function_rel_diff"] <= 1e-5
               for r in results.values()), results
    kept = {name: r["activation_bytes"] for name, r in results.items()}
    assert kept["reference"] == kept["plain"] > kept["efficient"] == kept["frugal"], kept  # no bottleneck


def test_bench_takes_a_volume_and_says_why_peers_are_left_out(capsys) -> None:
    argv = [*BENCH_TINY, "--img-size", "8", "8", "8", "--in-chans", "1", "--num-classes", "2", "--steps", "1",
            "--variants", "frugal,reference,tv"]
    assert load_tool("bench").main(argv) == 0
    out = capsys.readouterr().out
    assert "in_channels=1" in out and "out_channels=2" in out and "batch 2, 8x8x8" in out
    rows = bench_rows(out)
    assert rows["frugal"][1] != "-" and rows["reference"][1] != "-"
    assert rows["tv"][1] == "SKIPPED: torchvision has no counterpart of fcdensenet56 (modified)"


@pytest.mark.parametrize("argv, message", [
    (["--block-config", "2,2"], "--block-config do not apply to fcdensenet56; give FCDenseNet's arguments with "
                                "--model-kwargs"),
    (["--img-size", "16", "12", "--spatial-dims", "3"], "--img-size 16 12 is a 2D input but the model is 3D"),
    (["--img-size", "3"], "input of 3x3 does not survive the down path: its 2 max-pools need at least 4 positions"),
    (["--variants", "plain,fast"], "unknown variant 'fast'; choose from plain, efficient, frugal"),
])
def test_bench_refuses_what_does_not_apply_in_one_line(capsys, monkeypatch, argv, message) -> None:
    import effidense.benchmark.runner as runner

    monkeypatch.setattr(runner, "training_step", None)  # refused before any step
    assert load_tool("bench").main([*BENCH_TINY, *argv]) == 2
    line = one_line_error(capsys.readouterr().err)
    assert line.startswith("effidense bench: error: ") and message in line, line
