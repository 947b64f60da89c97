"""The trainer's answers to adversarial input (issue 22's probes): weights files read safely, one line for every
failure, nothing half-written left behind."""
from __future__ import annotations

import os
import pickle
from pathlib import Path

import pytest
import timm
import torch
from conftest import load_tool
from safetensors.torch import save_file

import effidense  # noqa: F401  (registers effi_* with timm)
from effidense.train import build_model, parse_args

tool = load_tool("train")

TINY = ["--model", "effi_densenet_bc100_k12", "--model-kwargs", "block_config=(2,2)", "growth_rate=4",
        "num_init_features=8"]
SYNTHETIC = ["--dataset", "synthetic", "--img-size", "8", "-b", "8", "--train-num-samples", "16",
             "--val-num-samples", "8", "-j", "0", "--warmup-epochs", "0"]


def _one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def _tiny_weights(num_classes: int = 10) -> dict[str, torch.Tensor]:
    model = timm.create_model("effi_densenet_bc100_k12", num_classes=num_classes, block_config=(2, 2), growth_rate=4,
                              num_init_features=8)
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


class _Payload:
    """Unpickling this runs code: it creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


# --- weights files: read by effidense's safe loader, whatever timm's version ---

@pytest.mark.parametrize("flag", ["--pretrained-path", "--initial-checkpoint"])
def test_a_pickle_payload_in_a_weights_file_never_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                       flag: str) -> None:
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as f:
        torch.save({"state_dict": _tiny_weights(), "extra": _Payload(marker)}, f, pickle_module=pickle)
    assert not marker.exists()
    argv = [*TINY, *SYNTHETIC, "--epochs", "1", flag, str(evil), "--output", str(tmp_path / "out")]
    assert tool.main(argv) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: {flag} {evil}:") and "unsafe" in line
    assert not marker.exists()
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("flag", ["--pretrained-path", "--initial-checkpoint"])
def test_a_truncated_safetensors_weights_file_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                          flag: str) -> None:
    weights = tmp_path / "w.safetensors"
    save_file(_tiny_weights(), weights)
    os.truncate(weights, weights.stat().st_size // 2)
    assert tool.main([*TINY, *SYNTHETIC, "--epochs", "1", flag, str(weights), "--output", str(tmp_path / "out")]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert line.startswith(f"error: {flag} {weights}:") and "truncated" in line


def test_a_nan_batchnorm_buffer_in_the_initial_weights_is_named(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    weights = _tiny_weights()
    weights["features.denseblock1.denselayer1.norm1.running_mean"][0] = float("nan")
    path = tmp_path / "nan.safetensors"
    save_file(weights, path)
    assert tool.main([*TINY, *SYNTHETIC, "--epochs", "1", "--initial-checkpoint", str(path),
                      "--output", str(tmp_path / "out")]) == 1
    line = _one_line_error(capsys.readouterr().err)
    assert "features.denseblock1.denselayer1.norm1.running_mean" in line and "NaN/inf" in line and "--lr" not in line


def test_weights_files_still_load(tmp_path: Path) -> None:
    weights = _tiny_weights(num_classes=10)
    path = tmp_path / "w.safetensors"
    save_file({f"module.{k}": v for k, v in weights.items()}, path)  # a DDP checkpoint's prefix is understood
    model = build_model(parse_args([*TINY, "--initial-checkpoint", str(path)]), 10)
    assert all(torch.equal(v, weights[k]) for k, v in model.state_dict().items())
    # --pretrained-path: the file's features, a new classifier for another number of classes
    model = build_model(parse_args([*TINY, "--pretrained-path", str(path)]), 3)
    state = model.state_dict()
    assert state["classifier.weight"].shape == (3, weights["classifier.weight"].shape[1])
    assert all(torch.equal(state[k], v) for k, v in weights.items() if not k.startswith("classifier."))
