"""FC-DenseNet weights through effidense.convert and `effidense convert`: the architecture read off the keys, to and
from safetensors, --verify in every memory mode, and one line for what does not fit."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import load_tool, one_line_error, perturb_norm
from safetensors import safe_open
from torch import nn

import effidense
from effidense import convert
from effidense.convert import ConversionError
from effidense.fcdensenet_weights import FCDenseNetArchitecture, infer_fcdensenet_architecture

cli = load_tool("convert")

TINY = dict(down_blocks=(2, 3), up_blocks=(3, 1), bottleneck_layers=2, growth_rate=4, init_features=6)


def tiny(spatial_dims: int = 2, in_channels: int = 2, out_channels: int = 5, seed: int = 0, **kwargs) -> nn.Module:
    """A tiny FC-DenseNet with non-default BatchNorm statistics and affine parameters, so that eval outputs depend on
    every tensor the file holds."""
    torch.manual_seed(seed)
    model = effidense.FCDenseNet(spatial_dims, in_channels, out_channels, **{**TINY, **kwargs})
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                perturb_norm(m, generator)
    return model.eval()


def run_cli(capsys, *args) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(x)


def test_a_training_checkpoint_converts_to_safetensors_and_back_verified(tmp_path, capsys):
    model = tiny()
    state_dict = {f"module.{k}": v for k, v in model.state_dict().items()}  # saved from DataParallel
    source = tmp_path / "seg.pth"
    torch.save({"state_dict": state_dict, "epoch": 4}, source)
    code, out, err = run_cli(capsys, "--checkpoint", source, "--output", tmp_path / "seg.safetensors", "--verify")
    assert code == 0, err
    assert "architecture: custom (spatial_dims=2, in_channels=2, out_channels=5, down_blocks=(2, 3), up_blocks=(3, 1)"\
           ", bottleneck_layers=2, growth_rate=4, init_features=6, bn_size=none)" in out
    assert "verify compared plain FCDenseNet, efficient FCDenseNet, frugal FCDenseNet and reference port" in out
    assert "verify: max abs difference 0 " in out and out.rstrip().endswith("ok")
    with safe_open(str(tmp_path / "seg.safetensors"), framework="pt") as f:
        meta = f.metadata()
    assert meta["effidense.network"] == "FCDenseNet" and meta["effidense.layout"] == "effidense"
    arch = FCDenseNetArchitecture.from_json(meta["effidense.architecture"])
    assert arch.build().state_dict().keys() == model.state_dict().keys()

    code, out, err = run_cli(capsys, "--checkpoint", tmp_path / "seg.safetensors", "--output", tmp_path / "back.pth",
                             "--verify")
    assert code == 0, err
    back = torch.load(tmp_path / "back.pth", weights_only=True)
    assert list(back) == list(model.state_dict())
    assert all(torch.equal(back[k], v) for k, v in model.state_dict().items())
    x = torch.randn(2, 2, 9, 7)
    for mode in ("plain", "efficient", "frugal"):
        loaded = arch.build(mode)
        loaded.load_state_dict(back)
        assert torch.equal(outputs(loaded, x), outputs(model, x))


@pytest.mark.parametrize("spatial_dims, kwargs", [(1, {}), (3, {}), (2, dict(bn_size=2)),
                                                  (2, dict(down_blocks=(1,), up_blocks=(2,), init_features=3))])
def test_the_architecture_is_read_off_the_keys(tmp_path, spatial_dims, kwargs):
    model = tiny(spatial_dims, in_channels=1, out_channels=3, **kwargs)
    state_dict = {k: v for k, v in model.state_dict().items() if not k.endswith("num_batches_tracked")}  # old file
    torch.save(state_dict, tmp_path / "in.pth")
    conversion, diff = convert.convert_checkpoint(tmp_path / "in.pth", tmp_path / "out.safetensors", verify=True)
    want = {**TINY, **kwargs}
    assert conversion.architecture == FCDenseNetArchitecture(
        spatial_dims, 1, 3, want["down_blocks"], want["up_blocks"], want["bottleneck_layers"], want["growth_rate"],
        want["init_features"], want.get("bn_size"))
    assert diff == 0 and conversion.spatial_dims == spatial_dims
    assert any("set" in note and "num_batches_tracked counters to 0" in note for note in conversion.notes)
    reference_port = kwargs.get("bn_size") is None
    assert any("reference port" in note for note in conversion.notes) == reference_port
    written = convert.load_checkpoint(tmp_path / "out.safetensors").state_dict
    assert written.keys() == model.state_dict().keys()


def test_the_paper_models_are_named_and_a_model_flag_is_checked():
    model = effidense.fcdensenet56(in_channels=1, out_channels=2)
    conversion = convert.convert_state_dict(model.state_dict())
    assert conversion.model_name == "fcdensenet56" and conversion.architecture.in_channels == 1
    assert convert.convert_state_dict(model.state_dict(), model="fcdensenet56").model_name == "fcdensenet56"
    with pytest.raises(ConversionError, match=r"^the weights do not fit fcdensenet67: \d+ mis-shaped: .*missing"):
        convert.convert_state_dict(model.state_dict(), model="fcdensenet67")
    with pytest.raises(ConversionError, match="the weights are an FC-DenseNet's, not a densenet121's"):
        convert.convert_state_dict(model.state_dict(), model="densenet121")
    densenet = effidense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8)
    with pytest.raises(ConversionError, match=r"fcdensenet56 is an FC-DenseNet, but the weights are a DenseNet's"):
        convert.convert_state_dict(densenet.state_dict(), model="fcdensenet56")


def test_keys_that_do_not_fit_are_named():
    state_dict = tiny().state_dict()
    key = "up.0.denselayer2.conv1.weight"
    state_dict[key] = torch.zeros(5, *state_dict[key].shape[1:])  # one corrupt tensor: outvoted, then named
    del state_dict["transitions_down.1.norm.bias"]
    state_dict["up.0.extra.weight"] = torch.zeros(3)
    with pytest.raises(ConversionError) as info:
        convert.convert_state_dict(state_dict)
    assert info.value.mismatched == [(key, (5, 38, 3, 3), (4, 38, 3, 3))]
    assert info.value.missing == ["transitions_down.1.norm.bias"] and info.value.unknown == ["up.0.extra.weight"]
    assert "\n" not in str(info.value) and str(info.value).startswith("the weights do not fit FCDenseNet(")
    assert infer_fcdensenet_architecture(state_dict).growth_rate == 4


def test_what_fc_densenet_weights_cannot_do_is_one_line(tmp_path, capsys):
    model = tiny()
    torch.save(model.state_dict(), tmp_path / "seg.pth")
    for flags, message in (
            (["--to", "torchvision"], "target layout torchvision has no FC-DenseNet"),
            (["--to", "monai"], "target layout monai has no FC-DenseNet"),
            (["--from", "timm"], "source layout timm has no FC-DenseNet"),
            (["--inflate", "mean"], "FC-DenseNet weights convert as they are"),
            (["--num-classes", "3"], "FC-DenseNet weights convert as they are")):
        code, _, err = run_cli(capsys, "--checkpoint", tmp_path / "seg.pth", "--output", tmp_path / "o.pth", *flags)
        assert code == 1 and message in one_line_error(err), (flags, err)
        assert not (tmp_path / "o.pth").exists()
    # up_blocks no longer match down_blocks: no FC-DenseNet has these weights
    state_dict = {k: v for k, v in model.state_dict().items() if not k.startswith(("up.1.", "transitions_up.1."))}
    with pytest.raises(ConversionError, match="the weights describe no valid FC-DenseNet: up_blocks must have as many"):
        convert.convert_state_dict(state_dict)
    grouped = effidense.FCDenseNet(2, 3, 2, **TINY, norm_layer=lambda c: effidense.GroupNormAct(2, c))
    with pytest.raises(ConversionError, match="no BatchNorm running statistics"):
        convert.convert_state_dict(grouped.state_dict())


def test_neither_a_densenet_nor_an_fc_densenet_is_one_line(tmp_path, capsys):
    torch.save(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).state_dict(), tmp_path / "other.pth")
    code, _, err = run_cli(capsys, "--checkpoint", tmp_path / "other.pth", "--output", tmp_path / "o.safetensors")
    assert code == 1
    assert one_line_error(err).startswith("error: not a DenseNet or FC-DenseNet checkpoint: no 4-d "
                                          "'features.conv0.weight' (a DenseNet's first convolution) and no "
                                          "'stem.weight' (an FC-DenseNet's)")


def test_verify_catches_a_memory_mode_that_computes_something_else(tmp_path, capsys, monkeypatch):
    torch.save(tiny().state_dict(), tmp_path / "seg.pth")
    forward = effidense.FCDenseNet.forward

    def frugal_differs(self, x):
        out = forward(self, x)
        return out + 1e-3 if self.memory == "frugal" else out

    monkeypatch.setattr(effidense.FCDenseNet, "forward", frugal_differs)
    code, out, err = run_cli(capsys, "--checkpoint", tmp_path / "seg.pth", "--output", tmp_path / "o.safetensors",
                             "--verify")
    assert code == 3 and not (tmp_path / "o.safetensors").exists()
    assert "max abs difference 0.001 between the plain FCDenseNet and the frugal FCDenseNet exceeds 1e-05" in \
           one_line_error(err)


def test_verify_compares_with_the_reference_port(tmp_path, monkeypatch):
    # the port, a second implementation, sees the source weights: a model that misreads them would differ from it
    from effidense.harness import tiramisu

    forward = tiramisu.ReferenceTiramisu.forward
    monkeypatch.setattr(tiramisu.ReferenceTiramisu, "forward", lambda self, x: forward(self, x) * 1.01)
    torch.save(tiny().state_dict(), tmp_path / "seg.pth")
    with pytest.raises(convert.VerificationError, match="plain FCDenseNet and the reference port exceeds"):
        convert.convert_checkpoint(tmp_path / "seg.pth", tmp_path / "o.safetensors", verify=True)
    assert not Path(tmp_path / "o.safetensors").exists()
    assert json.loads(convert.Conversion(
        {}, FCDenseNetArchitecture(2, 1, 1, (1,), (1,), 1, 2, 2), None, "effidense", "effidense").metadata()[
        "effidense.architecture"])["down_blocks"] == [1]
