"""Weight conversion between torchvision, timm and effidense layouts (effidense.convert and tools/convert.py)."""
from __future__ import annotations

import argparse
import errno
import json
import os
import random
import re
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from conftest import load_tool, perturb_norm
from safetensors import safe_open
from torch import nn

import effidense
from effidense import convert
from effidense.convert import Architecture, ConversionError
from effidense.fileio import UnreadableFileError, UnsafeFileError, load_safetensors, load_torch_file

TINY = dict(growth_rate=4, block_config=(2, 2), num_init_features=8)
TINY_ARCH = Architecture(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=10)
_MODERN = re.compile(r"^(.*denselayer\d+\.(?:norm|conv))([12])\.(weight|bias|running_mean|running_var)$")


cli = load_tool("convert")


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default BN statistics and affine parameters, so that eval outputs depend on every buffer."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                perturb_norm(m, generator)
            elif isinstance(m, nn.Linear):
                m.bias.copy_(torch.randn(m.out_features, generator=generator))
    return model.eval()


def tiny_torchvision(num_classes: int = 10) -> nn.Module:
    torch.manual_seed(0)
    return randomize(torchvision.models.DenseNet(**TINY, num_classes=num_classes))


def legacy(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The original densenet121-a639ec97.pth naming: 'denselayer1.norm.1.weight', no num_batches_tracked."""
    return {_MODERN.sub(r"\1.\2.\3", k): v for k, v in state_dict.items() if not k.endswith("num_batches_tracked")}


def save_legacy(model: nn.Module, path: Path) -> Path:
    # the old (pre-zip) serialization of the original torchvision files
    torch.save(legacy(model.state_dict()), path, _use_new_zipfile_serialization=False)
    return path


def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def test_legacy_key_helper_matches_torchvision_originals():
    keys = legacy(torchvision.models.densenet121().state_dict())
    assert "features.denseblock1.denselayer1.norm.1.weight" in keys
    assert "features.denseblock4.denselayer16.conv.2.weight" in keys
    assert "features.transition1.norm.weight" in keys  # transitions never had the dotted names


# --- the full DenseNet-121 round trips (the only tests that build it) ---

def test_torchvision_densenet121_legacy_file_to_timm_and_back(tmp_path, capsys):
    tv = randomize(torchvision.models.densenet121())
    source = save_legacy(tv, tmp_path / "densenet121-a639ec97.pth")
    x = torch.randn(1, 3, 64, 64)
    expected = logits(tv, x)

    converted = tmp_path / "densenet121_effi.safetensors"
    code, out, err = run_cli(capsys, "--checkpoint", source, "--output", converted, "--verify")
    assert code == 0, err
    assert "architecture: densenet121" in out and "legacy torchvision name" in out and "verify: max abs" in out

    for weights in (converted, source):  # our file, and the raw legacy torchvision file through the filter
        model = timm.create_model("effi_densenet121", pretrained=True, pretrained_cfg_overlay=dict(file=str(weights)))
        torch.testing.assert_close(logits(model, x), expected, rtol=0, atol=1e-5)

    back = tmp_path / "densenet121_tv.pth"
    code, _, err = run_cli(capsys, "--checkpoint", converted, "--output", back, "--to", "torchvision")
    assert code == 0, err
    restored = torchvision.models.densenet121()
    restored.load_state_dict(torch.load(back, weights_only=True), strict=True)
    for key, value in tv.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue  # the legacy file had none; they come back as 0
        assert torch.equal(restored.state_dict()[key], value), key
    torch.testing.assert_close(logits(restored, x), expected, rtol=0, atol=0)


def test_timm_densenet121_training_checkpoint_to_effidense_and_back(tmp_path, capsys):
    torch.manual_seed(1)
    tm = randomize(timm.create_model("densenet121"))
    x = torch.randn(1, 3, 64, 64)
    expected = logits(tm, x)
    # what timm's train.py saves under DDP: wrapped, 'module.'-prefixed, with an argparse.Namespace of settings
    wrapped = {"epoch": 3, "arch": "densenet121", "args": argparse.Namespace(lr=0.1, model="densenet121"),
               "state_dict": {f"module.{k}": v for k, v in tm.state_dict().items()}}
    source = tmp_path / "model_best.pth.tar"
    torch.save(wrapped, source)

    converted = tmp_path / "effi.safetensors"
    code, out, err = run_cli(capsys, "--checkpoint", source, "--output", converted, "--from", "timm",
                             "--model", "effi_densenet121", "--verify")
    assert code == 0, err
    assert "'module.'" in out and "took the weights under 'state_dict'" in out
    model = timm.create_model("effi_densenet121", pretrained=True, pretrained_cfg_overlay=dict(file=str(converted)))
    torch.testing.assert_close(logits(model, x), expected, rtol=0, atol=1e-5)

    back = tmp_path / "timm.safetensors"
    code, _, err = run_cli(capsys, "--checkpoint", converted, "--output", back, "--to", "timm", "--verify")
    assert code == 0, err
    restored = timm.create_model("densenet121", pretrained=True, pretrained_cfg_overlay=dict(file=str(back)))
    torch.testing.assert_close(logits(restored, x), expected, rtol=0, atol=0)


# --- small networks ---

def test_tiny_legacy_torchvision_converts_with_inferred_architecture(tmp_path):
    tv = tiny_torchvision()
    source = save_legacy(tv, tmp_path / "tiny.pth")
    conversion, diff = convert.convert_checkpoint(source, tmp_path / "tiny.safetensors", verify=True)
    assert conversion.architecture == TINY_ARCH
    assert conversion.model_name is None and conversion.source == "torchvision" and conversion.target == "effidense"
    assert diff is not None and diff <= convert.VERIFY_TOLERANCE
    assert any("num_batches_tracked" in note for note in conversion.notes)

    model = effidense.DenseNet(**conversion.architecture.model_kwargs())
    model.load_state_dict(convert.load_checkpoint(tmp_path / "tiny.safetensors").state_dict, strict=True)
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(model, x), logits(tv, x), rtol=0, atol=1e-6)


def test_pretrained_filter_loads_raw_legacy_torchvision_file(tmp_path):
    tv = tiny_torchvision()
    source = save_legacy(tv, tmp_path / "tiny.pth")
    model = timm.create_model("effi_densenet121", pretrained=True, num_classes=10, **TINY,
                              pretrained_cfg_overlay=dict(file=str(source), num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(logits(model, x), logits(tv, x), rtol=0, atol=1e-6)


def test_timm_tiny_round_trip_is_exact(tmp_path):
    torch.manual_seed(2)
    from timm.models.densenet import DenseNet as TimmDenseNet

    tm = randomize(TimmDenseNet(growth_rate=4, block_config=(2, 2), num_classes=10, in_chans=1))
    source = tmp_path / "timm.safetensors"
    from safetensors.torch import save_file

    save_file(tm.state_dict(), str(source))
    mid, back = tmp_path / "effi.safetensors", tmp_path / "back.safetensors"
    convert.convert_checkpoint(source, mid, source="timm", verify=True)
    convert.convert_checkpoint(mid, back, target="timm", verify=True)
    restored = convert.load_checkpoint(back).state_dict
    assert sorted(restored) == sorted(tm.state_dict())  # safetensors stores keys sorted
    for key, value in tm.state_dict().items():
        assert torch.equal(restored[key], value), key


def test_effidense_only_architecture(tmp_path):
    torch.manual_seed(3)
    model = randomize(effidense.DenseNet(growth_rate=4, block_config=(2, 2, 2), num_init_features=8, bn_size=None,
                                         compression=0.75, small_inputs=True, num_classes=10, in_chans=1))
    arch = convert.infer_architecture(model.state_dict())
    assert arch == Architecture(4, (2, 2, 2), 8, None, 0.75, True, 10, 1)
    assert len(convert.layout_limits("torchvision", arch)) == 4 and len(convert.layout_limits("timm", arch)) == 3
    source = tmp_path / "cifar.pth"
    torch.save(model.state_dict(), source)
    conversion, diff = convert.convert_checkpoint(source, tmp_path / "out.safetensors", verify=True)
    assert conversion.source == "effidense" and diff == 0
    with pytest.raises(ConversionError, match=r"target layout torchvision.*small_inputs=True.*bn_size=None"):
        convert.convert_checkpoint(source, tmp_path / "tv.pth", target="torchvision")
    with pytest.raises(ConversionError, match="source layout timm"):
        convert.convert_checkpoint(source, tmp_path / "x.pth", source="timm")


def test_every_config_is_recognised_from_its_weights():
    for name in effidense.CONFIGS:
        with torch.device("meta"):
            state_dict = getattr(effidense, name)(num_classes=7).state_dict()
        arch = convert.infer_architecture(state_dict)
        assert convert.match_config(arch) == name and arch.num_classes == 7
    assert convert.match_config(TINY_ARCH) is None


def test_safetensors_header_metadata(tmp_path):
    tv = tiny_torchvision()
    source = tmp_path / "tiny.pth"
    torch.save(tv.state_dict(), source)
    out = tmp_path / "tiny.safetensors"
    convert.convert_checkpoint(source, out, target="timm")
    with safe_open(str(out), framework="pt") as f:
        meta = f.metadata()
    assert meta["format"] == "pt"
    assert meta["effidense.format_version"] == convert.FORMAT_VERSION
    assert meta["effidense.layout"] == "timm" and meta["effidense.source_layout"] == "torchvision"
    assert meta["effidense.source_file"] == "tiny.pth" and meta["effidense.model"] == ""
    assert json.loads(meta["effidense.architecture"])["block_config"] == [2, 2]
    assert Architecture.from_json(meta["effidense.architecture"]) == TINY_ARCH
    # the layout recorded in the header is what auto-detection reports next time
    conversion, _ = convert.convert_checkpoint(out, tmp_path / "again.safetensors")
    assert conversion.source == "timm"


def test_header_metadata_that_the_weights_contradict_does_not_decide(tmp_path):
    from safetensors.torch import save_file

    cifar = effidense.DenseNet(**TINY, small_inputs=True, num_classes=3).state_dict()  # only effidense has it
    save_file(cifar, str(tmp_path / "cifar.safetensors"), metadata={"effidense.layout": "torchvision"})
    conversion, _ = convert.convert_checkpoint(tmp_path / "cifar.safetensors", tmp_path / "out1.safetensors")
    assert conversion.source == "effidense"
    assert conversion.notes[0] == (
        "source layout effidense (only effidense has this architecture; the file's metadata says torchvision, but "
        "torchvision's DenseNet cannot hold these weights (it has no small-input (CIFAR) stem (small_inputs=True)))")
    tv = tiny_torchvision().state_dict()
    save_file(tv, str(tmp_path / "tv.safetensors"), metadata={"effidense.layout": "monai"})
    conversion, _ = convert.convert_checkpoint(tmp_path / "tv.safetensors", tmp_path / "out2.safetensors")
    assert conversion.source == "torchvision" and "the file's metadata says monai, but its keys are not MONAI's" in \
        conversion.notes[0]
    monai = {k.replace("denselayer1.", "denselayer1.layers.").replace("denselayer2.", "denselayer2.layers."): v
             for k, v in tv.items()}
    save_file(monai, str(tmp_path / "monai.safetensors"), metadata={"effidense.layout": "timm"})
    conversion, _ = convert.convert_checkpoint(tmp_path / "monai.safetensors", tmp_path / "out3.safetensors")
    assert conversion.source == "monai" and "the file's metadata says timm, but its keys are MONAI's" in \
        conversion.notes[0]


def test_seed_usage_and_format_from_suffix(tmp_path, capsys):
    source = tmp_path / "densenet121-a639ec97.pth"
    save_legacy(tiny_torchvision(), source)
    out = tmp_path / "densenet121_effi.pth"
    code, _, err = run_cli(capsys, "--to", "efficient", "--checkpoint", source, "--output", out)
    assert code == 0, err
    state_dict = torch.load(out, weights_only=True)  # a plain .pth state dict, as the seed wrote
    assert "features.denseblock1.denselayer1.norm1.weight" in state_dict
    code, out_text, err = run_cli(capsys, "--to", "normal", "--checkpoint", out, "--output", tmp_path / "tv")
    assert code == 0, err
    assert "-> torchvision layout" in out_text
    assert convert.load_checkpoint(tmp_path / "tv").metadata["effidense.layout"] == "torchvision"  # safetensors
    code, _, err = run_cli(capsys, "--checkpoint", out, "--output", tmp_path / "a.safetensors", "--format", "pth")
    assert code == 1 and "contradicts the output name a.safetensors" in err


def test_model_option_checks_shapes(tmp_path, capsys):
    torch.manual_seed(4)
    model = effidense.densenet40_k12(num_classes=100)
    source = tmp_path / "d40.pth"
    torch.save(model.state_dict(), source)
    conversion, _ = convert.convert_checkpoint(source, tmp_path / "ok.safetensors", model="effi_densenet40_k12")
    assert conversion.model_name == "densenet40_k12" and conversion.architecture.num_classes == 100
    code, _, err = run_cli(capsys, "--checkpoint", source, "--output", tmp_path / "bad.safetensors",
                           "--model", "densenet_bc100_k12")
    assert code == 1
    assert err.startswith("error: the weights do not fit densenet_bc100_k12:") and err.count("\n") == 1
    assert "mis-shaped: features.conv0.weight [16, 3, 3, 3] (expected [24, 3, 3, 3])" in err
    assert "missing: features.denseblock1.denselayer1.norm2.weight" in err
    code, _, err = run_cli(capsys, "--checkpoint", source, "--output", tmp_path / "bad.safetensors",
                           "--model", "resnet50")
    assert code == 1 and "unknown model 'resnet50'" in err
    assert not (tmp_path / "bad.safetensors").exists()


def test_unknown_missing_and_misshaped_keys_are_listed():
    state_dict = tiny_torchvision().state_dict()
    state_dict["features.extra.weight"] = torch.zeros(3)
    del state_dict["features.denseblock2.denselayer1.norm1.running_var"]
    state_dict["classifier.bias"] = torch.zeros(11)
    with pytest.raises(ConversionError) as info:
        convert.convert_state_dict(state_dict)
    error = info.value
    assert error.unknown == ["features.extra.weight"]
    assert error.missing == ["features.denseblock2.denselayer1.norm1.running_var"]
    assert error.mismatched == [("classifier.bias", (11,), (10,))]
    for key in ("features.extra.weight", "norm1.running_var", "classifier.bias [11] (expected [10])"):
        assert key in str(error)


def test_a_corrupt_tensor_is_blamed_not_the_keys_it_would_mislead(tmp_path, capsys):
    """transition1's corrupt conv read as compression 0.25 blamed 275 good keys and left it out."""
    with torch.device("meta"):
        shapes = torchvision.models.densenet121().state_dict()
    state_dict = {k: torch.zeros(v.shape, dtype=v.dtype) for k, v in shapes.items()}
    state_dict["features.transition1.conv.weight"] = torch.zeros(64, 256, 1, 1)
    source = tmp_path / "corrupt.pth"
    torch.save(state_dict, source)
    blamed = "1 mis-shaped: features.transition1.conv.weight [64, 256, 1, 1] (expected [128, 256, 1, 1])"
    for model in ([], ["--model", "densenet121"]):
        code, out, err = run_cli(capsys, "--checkpoint", source, "--output", tmp_path / "out.safetensors", *model)
        assert code == 1 and out == "" and err.count("\n") == 1, err
        assert blamed in err and "missing" not in err and "unknown" not in err
        assert "densenet121" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["corrupt.pth"]
    with pytest.raises(ConversionError) as info:
        convert.convert_state_dict(state_dict)
    assert info.value.mismatched == [("features.transition1.conv.weight", (64, 256, 1, 1), (128, 256, 1, 1))]
    assert not info.value.missing and not info.value.unknown


@pytest.mark.parametrize("key", ["features.conv0.weight", "features.denseblock1.denselayer1.conv1.weight",
                                 "features.denseblock1.denselayer1.conv2.weight", "features.transition1.conv.weight",
                                 "features.transition2.conv.weight", "features.denseblock2.denselayer1.norm1.weight",
                                 "features.norm0.weight", "features.norm5.running_var"])
def test_inference_blames_exactly_the_corrupt_key(key):
    model = randomize(effidense.DenseNet(growth_rate=4, block_config=(2, 3, 2), num_init_features=8, num_classes=10))
    state_dict = model.state_dict()
    shape = list(state_dict[key].shape)
    shape[0] = shape[0] // 2 + 1  # a plausible but wrong width
    state_dict[key] = torch.zeros(shape)
    with pytest.raises(ConversionError) as info:
        convert.convert_state_dict(state_dict)
    assert [k for k, _, _ in info.value.mismatched] == [key] and not info.value.missing and not info.value.unknown
    assert convert.infer_architecture(state_dict) == convert.infer_architecture(model.state_dict())


def test_not_a_densenet():
    with pytest.raises(ConversionError,
                       match="not a DenseNet or FC-DenseNet checkpoint: no 4-d 'features.conv0.weight'"):
        convert.convert_state_dict(torchvision.models.resnet18().state_dict())
    with pytest.raises(ConversionError, match=r"keys 'module.classifier.bias' and 'classifier.bias' both mean"):
        convert.canonical_state_dict({"module.classifier.bias": torch.zeros(1), "classifier.bias": torch.zeros(1)})


class _Payload:
    """Stands for anything a pickle could smuggle in besides tensors."""


def test_pickled_code_is_refused(tmp_path, capsys):
    source = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny_torchvision().state_dict(), "payload": _Payload()}, source)
    code, _, err = run_cli(capsys, "--checkpoint", source, "--output", tmp_path / "out.safetensors")
    assert code == 1 and err.count("\n") == 1
    assert "refused to load" in err and "_Payload" in err and "weights_only=True" in err
    assert not (tmp_path / "out.safetensors").exists()


@pytest.mark.parametrize("damage", ["truncated_pth", "truncated_safetensors", "garbage", "empty", "legacy_half"])
def test_corrupt_files_give_one_line_errors(tmp_path, capsys, damage):
    state_dict = tiny_torchvision().state_dict()
    good = tmp_path / "good"
    if damage == "truncated_safetensors":
        from safetensors.torch import save_file

        save_file(state_dict, str(good))
    else:
        torch.save(state_dict, good, _use_new_zipfile_serialization=damage != "legacy_half")
    data = good.read_bytes()
    bad = tmp_path / "bad.pth"
    bad.write_bytes({"garbage": b"\x00\x01not a checkpoint" * 20, "empty": b""}.get(damage, data[: len(data) // 2]))
    code, out, err = run_cli(capsys, "--checkpoint", bad, "--output", tmp_path / "out.safetensors")
    assert code == 1 and out == "" and err.count("\n") == 1 and "Traceback" not in err
    assert ("corrupt or truncated" in err) or (damage == "empty" and "the file is empty" in err)
    with pytest.raises(ConversionError):
        convert.load_checkpoint(bad)


def test_missing_input_and_bad_output_directory(tmp_path, capsys):
    code, _, err = run_cli(capsys, "--checkpoint", tmp_path / "nope.pth", "--output", tmp_path / "o.safetensors")
    assert code == 1 and "checkpoint not found" in err
    source = tmp_path / "tiny.pth"
    torch.save(tiny_torchvision().state_dict(), source)
    code, _, err = run_cli(capsys, "--checkpoint", source, "--output", tmp_path / "no" / "dir" / "o.safetensors")
    assert code == 1 and "does not exist" in err
    with pytest.raises(SystemExit) as info:
        cli.main(["--checkpoint", str(source), "--output", "x", "--to", "onnx"])
    assert info.value.code == 2


def test_never_overwrites_without_force(tmp_path, capsys):
    source = tmp_path / "tiny.pth"
    torch.save(tiny_torchvision().state_dict(), source)
    out = tmp_path / "out.safetensors"
    out.write_bytes(b"precious")
    code, _, err = run_cli(capsys, "--checkpoint", source, "--output", out)
    assert code == 1 and " exists (pass --force to overwrite)" in err
    assert out.read_bytes() == b"precious"
    code, _, err = run_cli(capsys, "--checkpoint", source, "--output", out, "--force")
    assert code == 0, err
    assert convert.load_checkpoint(out).metadata["effidense.layout"] == "effidense"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.safetensors", "tiny.pth"]  # no temporary files left


def test_failed_verification_writes_nothing(tmp_path, capsys, monkeypatch):
    source = tmp_path / "tiny.pth"
    torch.save(tiny_torchvision().state_dict(), source)
    monkeypatch.setattr(convert, "verify_conversion", lambda *args, **kwargs: 0.5)
    code, _, err = run_cli(capsys, "--checkpoint", source, "--output", tmp_path / "out.safetensors", "--verify")
    assert code == 3 and "max abs difference 0.5" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pth"]


def damaged(state_dict: dict[str, torch.Tensor], damage: str) -> dict[str, torch.Tensor]:
    """``state_dict`` with values no trained model has (see effidense.weights.values_problem)."""
    state_dict = {k: v.clone() for k, v in state_dict.items()}
    key = "features.norm5.running_var" if damage in ("nan", "negative_var") else "features.conv0.weight"
    if damage == "nan":
        state_dict[key][0] = float("nan")
    elif damage == "inf":
        state_dict[key].view(-1)[3] = float("-inf")
    elif damage == "negative_var":
        state_dict[key][2] = -0.5
    else:
        state_dict[key] = state_dict[key].to(getattr(torch, damage))
    return state_dict


DAMAGES = {
    "nan": "1 tensor(s) hold NaN/inf values: features.norm5.running_var",
    "inf": "1 tensor(s) hold NaN/inf values: features.conv0.weight",
    "bool": "1 tensor(s) are not floating point, so they are no weights: features.conv0.weight (bool)",
    "int64": "1 tensor(s) are not floating point, so they are no weights: features.conv0.weight (int64)",
    "negative_var": "1 BatchNorm running_var tensor(s) hold negative variances (the model would output NaN): "
                    "features.norm5.running_var",
}


@pytest.mark.parametrize("damage", DAMAGES)
@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
@pytest.mark.parametrize("verify", [False, True])
def test_values_no_model_has_are_refused_on_load_and_nothing_is_written(tmp_path, capsys, damage, fmt, verify):
    from safetensors.torch import save_file

    bad = damaged(tiny_torchvision().state_dict(), damage)
    source = tmp_path / f"tiny.{fmt}"
    if fmt == "pth":
        torch.save(bad, source)
    else:
        save_file(bad, str(source))
    code, out, err = run_cli(capsys, "--checkpoint", source, "--output", tmp_path / "out.safetensors",
                             *(["--verify"] if verify else []))
    assert code == 1 and out == "" and "Traceback" not in err, err
    assert err == f"error: {source}: {DAMAGES[damage]}\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == [source.name]
    with pytest.raises(ConversionError, match=rf"^{re.escape(str(source))}: {re.escape(DAMAGES[damage])}$"):
        convert.load_checkpoint(source)


@pytest.mark.parametrize("damage", DAMAGES)
def test_values_no_model_has_are_refused_from_python(damage):
    bad = damaged(tiny_torchvision().state_dict(), damage)
    with pytest.raises(ConversionError, match=rf"^{re.escape(DAMAGES[damage])}$"):
        convert.convert_state_dict(bad)
    with pytest.raises(ConversionError, match=rf"^{re.escape(DAMAGES[damage])}$"):
        convert.inflate(bad)


@pytest.mark.parametrize("damage", DAMAGES)
def test_save_checkpoint_writes_only_what_load_checkpoint_reads(tmp_path, damage):
    bad = damaged(tiny_torchvision().state_dict(), damage)
    for name in ("bad.safetensors", "bad.pth"):
        output = tmp_path / name
        with pytest.raises(ConversionError, match=rf"^cannot write {re.escape(str(output))}: "
                                                  rf"{re.escape(DAMAGES[damage])}$"):
            convert.save_checkpoint(bad, output)
    with pytest.raises(ConversionError, match="not a state dict: 1 entries are not tensors: step"):
        convert.save_checkpoint({"step": 3}, tmp_path / "step.pth")
    assert list(tmp_path.iterdir()) == []


def test_verification_detects_a_wrong_model(tmp_path):
    tv = tiny_torchvision()
    converted = convert.convert_state_dict(tv.state_dict())
    broken = dict(converted.state_dict)
    broken["features.norm5.running_mean"] = broken["features.norm5.running_mean"] + 1e-3
    diff = convert.verify_conversion(tv.state_dict(), "torchvision", broken, "effidense", converted.architecture)
    assert diff > convert.VERIFY_TOLERANCE
    same = convert.verify_conversion(tv.state_dict(), "torchvision", converted.state_dict, "timm",
                                     converted.architecture)
    assert same <= convert.VERIFY_TOLERANCE


def test_training_checkpoint_wrappers_and_ema(tmp_path, capsys):
    tv = tiny_torchvision()
    weights = tv.state_dict()
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    source = tmp_path / "ckpt.pth"
    torch.save({"model": {f"_orig_mod.{k}": v for k, v in weights.items()}, "model_ema": ema, "step": 10}, source)
    plain = convert.load_checkpoint(source)
    assert any("EMA" in note for note in plain.notes)
    conversion = convert.convert_state_dict(plain.state_dict)
    assert torch.equal(conversion.state_dict["features.conv0.weight"], weights["features.conv0.weight"])
    out = tmp_path / "ema.safetensors"
    code, _, err = run_cli(capsys, "--checkpoint", source, "--output", out, "--ema")
    assert code == 0, err
    assert torch.equal(convert.load_checkpoint(out).state_dict["features.conv0.weight"], ema["features.conv0.weight"])
    torch.save({"step": 3, "optimizer": {}}, tmp_path / "nothing.pth")
    with pytest.raises(ConversionError, match="no state dict found: top-level keys are step, optimizer"):
        convert.load_checkpoint(tmp_path / "nothing.pth")
    with pytest.raises(ConversionError, match="no EMA weights"):
        convert.load_checkpoint(tmp_path / "nothing.pth", use_ema=True)


def test_a_pruned_models_weights_are_folded_as_prune_remove_leaves_them(tmp_path, capsys):
    """A state dict saved while ``torch.nn.utils.prune`` is on holds ``weight_orig`` and ``weight_mask``: the
    converter folds each pair into the weight, as ``prune.remove`` does, says so, and torchvision loads the result."""
    import torch.nn.utils.prune as prune
    model = effidense.DenseNet(**TINY, num_classes=10)
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            prune.l1_unstructured(module, "weight", amount=0.3)
    source, out = tmp_path / "pruned.pth", tmp_path / "tv.pth"
    torch.save(model.state_dict(), source)
    code, stdout, err = run_cli(capsys, "--checkpoint", source, "--output", out, "--to", "torchvision",
                                "--format", "pth")
    assert code == 0, err
    assert "folded the pruning masks of" in stdout + err
    reference = torchvision.models.DenseNet(**TINY, num_classes=10)
    reference.load_state_dict(torch.load(out))
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            assert torch.equal(reference.get_submodule(name).weight, module.weight), name


# --- one-line errors, no traceback, no partial output ---

def tiny_source(tmp_path: Path) -> Path:
    source = tmp_path / "tiny.pth"
    torch.save(tiny_torchvision().state_dict(), source)
    return source


def assert_one_line_failure(tmp_path: Path, code: int, out: str, err: str, *expected: str) -> None:
    assert code == 1 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    for text in expected:
        assert text in err, (text, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny.pth"]  # no output, no temporary file


def test_read_only_output_directory_fails_before_any_work(tmp_path, capsys, monkeypatch):
    source = tiny_source(tmp_path)

    def never(*args, **kwargs):
        raise AssertionError("the checkpoint was read before the output was checked")

    monkeypatch.setattr(convert, "load_checkpoint", never)
    # a genuinely unwritable directory: sysfs does not take new files, not even from root
    code, out, err = run_cli(capsys, "--checkpoint", source, "--output", "/sys/out.safetensors")
    assert_one_line_failure(tmp_path, code, out, err, "cannot write /sys/out.safetensors")
    assert not Path("/sys/out.safetensors").exists()

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.mkstemp", read_only)
    output = tmp_path / "out.safetensors"
    code, out, err = run_cli(capsys, "--checkpoint", source, "--output", output)
    assert_one_line_failure(tmp_path, code, out, err, f"cannot write {output}", "Read-only file system")


@pytest.mark.parametrize("fmt", ["safetensors", "pth"])
@pytest.mark.parametrize("raised", ["OSError", "library"])
def test_full_disk_names_the_output_and_leaves_nothing(tmp_path, capsys, monkeypatch, fmt, raised):
    source = tiny_source(tmp_path)
    from safetensors import SafetensorError

    def full_disk(tensors, path, *args, **kwargs):
        if hasattr(path, "write"):  # torch.save is handed an open file
            path.write(b"half a file")
        else:
            Path(path).write_bytes(b"half a file")  # the disk filled up part way
        if raised == "OSError":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        if fmt == "safetensors":  # what safetensors raises when its write fails
            raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: '
                                  '"No space left on device" })')
        raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 0: "
                           "PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr("safetensors.torch.save_file" if fmt == "safetensors" else "torch.save", full_disk)
    output = tmp_path / f"out.{fmt}"
    code, out, err = run_cli(capsys, "--checkpoint", source, "--output", output)
    assert_one_line_failure(tmp_path, code, out, err, f"error: cannot write {output}: ")
    if raised == "library" and fmt == "pth":  # torch's own words, when it gives no system error to report
        assert err == f"error: cannot write {output}: [enforce fail at inline_container.cc:664] . unexpected pos " \
                      "64 vs 0: PytorchStreamWriter failed writing file data/0: file write failed\n"
    else:
        assert err == f"error: cannot write {output}: No space left on device\n"


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs Linux's /dev/full (every write: ENOSPC)")
@pytest.mark.parametrize("legacy", [False, True])
def test_a_full_disk_under_torch_save_says_no_space_left(tmp_path, capsys, monkeypatch, legacy):
    """torch.save's own writer on a full disk says 'unexpected pos 704 vs 598'; the system's reason must show."""
    from effidense import fileio

    source = tiny_source(tmp_path)
    output = tmp_path / "out.pth"

    def full_disk_open(file, mode="r", *args, **kwargs):
        # the temporary file beside the output is opened on /dev/full, where every write fails with ENOSPC
        if "w" in mode and Path(file).name.startswith(f".{output.name}."):
            return open("/dev/full", mode, *args, **kwargs)
        return open(file, mode, *args, **kwargs)

    monkeypatch.setattr(fileio, "open", full_disk_open, raising=False)
    if legacy:
        save = torch.save
        monkeypatch.setattr("torch.save", lambda *a, **k: save(*a, **k, _use_new_zipfile_serialization=False))
    code, out, err = run_cli(capsys, "--checkpoint", source, "--output", output)
    assert_one_line_failure(tmp_path, code, out, err)
    assert err == f"error: cannot write {output}: No space left on device\n"


def test_integer_keys_and_sparse_tensors_are_refused(tmp_path, capsys, recwarn):
    state_dict = tiny_torchvision().state_dict()
    cases = {
        "integer_keys.pth": ({i: v for i, v in enumerate(state_dict.values())}, "keys are not strings: 0, 1, 2"),
        "sparse.pth": ({**state_dict, "features.conv0.weight": state_dict["features.conv0.weight"].to_sparse()},
                       "1 tensors are not dense (strided) tensors: features.conv0.weight (torch.sparse_coo)"),
    }
    for name, (bad, message) in cases.items():
        source = tmp_path / name
        torch.save(bad, source)
        code, out, err = run_cli(capsys, "--checkpoint", source, "--output", tmp_path / "out.safetensors")
        assert code == 1 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
        assert f"{source}: " in err and message in err
        with pytest.raises(ConversionError, match=re.escape(message)):
            convert.convert_state_dict(bad)  # the same refusal from Python
    assert not (tmp_path / "out.safetensors").exists()
    assert not [str(w.message) for w in recwarn]  # nothing but the one line, not even torch's sparse warning


class _RunsShellCommand:
    """A real attack: unpickling calls os.system(command)."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


def test_a_pickle_that_calls_os_system_is_refused_as_unsafe_and_never_runs(tmp_path, capsys):
    marker = tmp_path / "pwned"
    source = tmp_path / "evil.pth"
    torch.save({"state_dict": tiny_torchvision().state_dict(), "x": _RunsShellCommand(f"touch {marker}")}, source)
    code, out, err = run_cli(capsys, "--checkpoint", source, "--output", tmp_path / "out.safetensors")
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert "unsafe" in err and "system" in err and "corrupt" not in err and str(source) in err
    assert not marker.exists() and not (tmp_path / "out.safetensors").exists()


def test_one_description_of_which_densenet():
    from effidense.modelspec import resolve_model

    spec = resolve_model("densenet_bc100_k12", {"num_classes": 10, "drop_rate": 0.1, "spatial_dims": 3})
    arch = spec.architecture
    assert isinstance(arch, Architecture) and arch.num_classes == 10 and arch.small_inputs and arch.spatial_dims == 3
    assert arch.spec("again").architecture == arch and "drop_rate" not in arch.model_kwargs()
    default = Architecture.from_kwargs({})  # DenseNet's own defaults
    assert (default.growth_rate, default.block_config, default.num_init_features, default.spatial_dims) == (
        32, (6, 12, 24, 16), 64, 2)
    assert convert.match_config(resolve_model("densenet121").architecture) == "densenet121"


def test_a_torchscript_archive_is_named_as_one_not_corrupt(tmp_path, capsys):
    source = tmp_path / "model.pt"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # TorchScript's deprecation notices
        torch.jit.save(torch.jit.script(nn.Linear(2, 2)), str(source))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # not even torch's "dispatching to torch.jit.load"
        code, out, err = run_cli(capsys, "--checkpoint", source, "--output", tmp_path / "out.safetensors")
    assert code == 1 and out == ""
    assert err == (f"error: {source} is a TorchScript archive (a scripted or traced model), not a checkpoint of "
                   "weights: load it with torch.jit.load and save its state_dict() with torch.save\n")


# --- corrupt or unsafe ---

@pytest.mark.parametrize("head", [b"PK", b"PK\x03\x04", b"PK\x05\x06", b"\x80\x02", b"("])
@pytest.mark.parametrize("seed", range(3))
def test_random_bytes_after_a_header_are_corrupt_not_unsafe(tmp_path, head, seed):
    source = tmp_path / "r.pth"
    source.write_bytes(head + random.Random(seed).randbytes(4096))
    with pytest.raises(UnreadableFileError, match=rf"^{re.escape(str(source))}: corrupt or truncated") as info:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # torch warns of the random "protocol" it reads
            load_torch_file(source)
    assert not isinstance(info.value, UnsafeFileError)


@pytest.mark.parametrize("how", ["zip", "legacy", "pickle"])
@pytest.mark.parametrize("payload", ["class", "os.system"])
def test_real_pickled_objects_are_still_unsafe(tmp_path, how, payload):
    marker = tmp_path / "pwned"
    obj = {"state_dict": {"w": torch.zeros(2)},
           "x": _Payload() if payload == "class" else _RunsShellCommand(f"touch {marker}")}
    source = tmp_path / "evil.pth"
    if how == "pickle":  # no torch.save at all: a plain pickle, as an attacker might write it
        import pickle

        source.write_bytes(pickle.dumps(obj, protocol=0))
    else:
        torch.save(obj, source, _use_new_zipfile_serialization=how == "zip")
    with pytest.raises(UnsafeFileError, match=rf"^{re.escape(str(source))}: refused to load \(unsafe\)"):
        load_torch_file(source)
    assert not marker.exists()


# --- files that are not what their name says ---

def test_a_pytorch_checkpoint_named_safetensors_is_read_by_its_content(tmp_path, capsys):
    state_dict = tiny_torchvision().state_dict()
    disguised = tmp_path / "x.safetensors"
    torch.save(state_dict, disguised)
    loaded = convert.load_checkpoint(disguised)  # "the format is recognised from the content, not the name"
    assert loaded.state_dict.keys() == state_dict.keys() and loaded.metadata == {}
    assert f"{disguised.name} is a PyTorch checkpoint, not a safetensors file; read as one" in loaded.notes
    code, out, err = run_cli(capsys, "--checkpoint", disguised, "--output", tmp_path / "out.safetensors", "--verify")
    assert code == 0, err
    assert "is a PyTorch checkpoint, not a safetensors file" in out and "verify: max abs difference" in out
    assert load_torch_file(disguised).keys() == state_dict.keys()  # torch.load alone goes by the name


def test_a_safetensors_file_named_pth_is_read_by_its_content(tmp_path):
    from safetensors.torch import save_file

    state_dict = tiny_torchvision().state_dict()
    disguised = tmp_path / "x.pth"
    save_file(state_dict, str(disguised))
    loaded = convert.load_checkpoint(disguised)
    assert loaded.state_dict.keys() == state_dict.keys()
    assert loaded.notes == ["x.pth is a safetensors file, not a PyTorch checkpoint; read as one"]
    assert load_safetensors(disguised)[0].keys() == state_dict.keys()


def test_the_readers_of_one_format_say_what_the_file_is(tmp_path):
    from safetensors.torch import save_file

    state_dict = tiny_torchvision().state_dict()
    pth, safetensors = tmp_path / "x.safetensors", tmp_path / "y.pt"
    torch.save(state_dict, pth)
    save_file(state_dict, str(safetensors))
    with pytest.raises(UnreadableFileError,
                       match=rf"^{re.escape(str(pth))} is not a safetensors file \(it looks like a PyTorch "
                             r"checkpoint\)$"):
        load_safetensors(pth)
    with pytest.raises(UnreadableFileError,
                       match=rf"^{re.escape(str(safetensors))} is not a PyTorch checkpoint \(it is a safetensors "
                             r"file\)$"):
        load_torch_file(safetensors)


@pytest.mark.parametrize("head", [b"PK", b"PK\x03\x04", b"\x80\x02", b"{}"])
def test_random_bytes_named_safetensors_are_one_line(tmp_path, capsys, head):
    source = tmp_path / "r.safetensors"
    source.write_bytes(head + random.Random(1).randbytes(4096))
    code, out, err = run_cli(capsys, "--checkpoint", source, "--output", tmp_path / "out.safetensors")
    assert code == 1 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert f"{source}" in err and ("corrupt" in err or "not a safetensors file" in err) and "unsafe" not in err
    with pytest.raises(UnreadableFileError, match=rf"^{re.escape(str(source))}"):
        load_safetensors(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.safetensors"]
