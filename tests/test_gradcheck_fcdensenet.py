"""`effidense gradcheck --model fcdensenet56|67|103`: the exactness checks on an FC-DenseNet (tiny ones here), CPU."""
from __future__ import annotations

import json

import pytest
import torch
from conftest import load_tool, one_line_error

import effidense.verify
from effidense import fcdensenet
from effidense.verify import autograd_gradcheck

# fcdensenet56's layout with one pooling and one layer per block: every part of the network, in a second or two
TINY = ["--model", "fcdensenet56", "--model-kwargs", "down_blocks=(1,)", "up_blocks=(1,)", "bottleneck_layers=1",
        "--growth-rate", "2", "--num-init-features", "4", "--num-classes", "3", "--img-size", "5", "--batch-size",
        "2", "--threads", "1", "--quiet"]


@pytest.fixture(scope="module")
def gradcheck():
    return load_tool("gradcheck")


def run(module, argv, capsys):
    code = module.main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_a_tiny_fc_densenet_passes_every_check(gradcheck, capsys, tmp_path):
    code, out, err = run(gradcheck, [*TINY, "--json", tmp_path / "checks.json"], capsys)
    assert code == 0, out + err
    assert "models: fcdensenet56 (modified) (FC-DenseNet, blocks (1,) - 1 - (1,)" in out and "PASS: all" in out
    for case in ("fp32", "dropout 0.2", "BN momentum=None", "channels_last", "fp64", "autocast bf16"):
        for variant in ("efficient", "frugal"):
            assert any(line.startswith(f"fcdensenet56 (modified) / {case} ") and f" {variant} " in line
                       and line.rstrip().endswith("PASS") for line in out.splitlines()), (case, variant)
    for mode in ("plain", "efficient", "frugal"):
        assert f"[gradcheck] gradcheck FC-DenseNet / float64, train mode: {mode}" in out
    checks = json.loads((tmp_path / "checks.json").read_text())["checks"]
    # tiny reruns are never sliced ('auto' slices from 32 MiB), so every mode is bitwise plain's in fp32, dropout too
    bitwise = [c for c in checks if c["group"] == "modes" and c["case"].endswith(("/ fp32", "/ dropout 0.2"))
               and c["what"] in ("output", "grads", "BN stats", "BN count", "params")]
    assert len(bitwise) == 2 * 2 * 5 and all(c["max_abs"] == 0 for c in bitwise)


def test_a_mode_that_computes_something_else_fails(gradcheck, capsys, monkeypatch):
    forward = fcdensenet.TransitionDown.forward

    def off_in_segments(self, maps, segment=False):  # a transition down that errs only where it is recomputed
        out = forward(self, maps, segment)
        return out * 1.001 if segment else out

    monkeypatch.setattr(fcdensenet.TransitionDown, "forward", off_in_segments)
    code, out, _ = run(gradcheck, [*TINY, "--skip-gradcheck", "--steps", "1"], capsys)
    assert code == 1
    failed = [line for line in out.splitlines() if line.rstrip().endswith("FAIL")]
    assert failed and all(" plain " not in line for line in failed)
    assert any(" efficient " in line for line in failed) and any(" frugal " in line for line in failed)


def test_volumes_and_signals(gradcheck, capsys):
    code, out, _ = run(gradcheck, [*TINY, "--spatial-dims", "3", "--img-size", "3", "--steps", "1",
                                   "--skip-gradcheck"], capsys)
    assert code == 0, out
    assert "batch 2, 3x3x3," in out and "/ channels_last_3d" in out and "spatial_dims=3" in out
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for dims in (1, 3):
            checks = autograd_gradcheck("frugal", spatial_dims=dims, segmentation=True)
            assert all(c.passed for c in checks), checks
            assert checks[0].case == f"gradcheck FC-DenseNet {dims}D / float64, train mode"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("argv, message", [
    (["--block-config", "2,2"], "--block-config do not apply to fcdensenet56; give FCDenseNet's arguments with "
                                "--model-kwargs"),
    (["--img-size", "1"], "--img-size 1: fcdensenet56 (modified) needs inputs of at least 2x2"),
    (["--model-kwargs", "down_blocks=(1,)", "up_blocks=(1,1)"], "up_blocks must have as many blocks as down_blocks"),
    (["--model-kwargs", "block_config=(1,)"], "unknown FCDenseNet argument(s) block_config"),
])
def test_bad_input_is_one_line_before_any_check(gradcheck, capsys, monkeypatch, argv, message):
    monkeypatch.setattr(effidense.verify, "run_local_checks", lambda *a, **k: pytest.fail("checks ran"))
    code, out, err = run(gradcheck, [*TINY, *argv], capsys)
    assert code == 2 and out == ""
    assert message in one_line_error(err)
