"""MONAI's DenseNet layout in `effidense convert`, and 2D -> 3D inflation.

MONAI's own DenseNet (monai.networks.nets.DenseNet, spatial_dims=2 and 3) is the peer the converted weights must load
into strictly and compute the same function with; effidense's conversion itself never imports MONAI.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
import torchvision
from conftest import QUICK_EXIT, ROOT, load_tool, perturb_norm
from safetensors import safe_open
from torch import nn

import effidense
from effidense import convert
from effidense.convert import ConversionError

monai_nets = pytest.importorskip("monai.networks.nets")

# the brief's tiny MONAI config, in both libraries' words
MONAI_TINY = dict(init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2)
EFFI_TINY = dict(num_init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2)
CLASSES = 5

cli = load_tool("convert")


def randomize(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-default BN statistics and affine parameters and a non-zero classifier bias, so that eval outputs depend
    on every tensor; eval mode, float64."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                perturb_norm(m, generator)
            elif isinstance(m, (nn.Conv2d, nn.Linear)):
                m.weight.copy_(torch.randn(m.weight.shape, generator=generator) / m.weight[0].numel() ** 0.5)
                if m.bias is not None:
                    m.bias.copy_(torch.randn(m.bias.shape, generator=generator))
    return model.double().eval()


def tiny_effidense(seed: int = 0, in_chans: int = 3) -> nn.Module:
    return randomize(effidense.DenseNet(**EFFI_TINY, num_classes=CLASSES, in_chans=in_chans), seed)


def monai_net(spatial_dims: int, in_channels: int = 3) -> nn.Module:
    return monai_nets.DenseNet(spatial_dims=spatial_dims, in_channels=in_channels, out_channels=CLASSES,
                               **MONAI_TINY).double().eval()


def monai_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """MONAI's pooled features (class_layers before its Linear) and logits."""
    with torch.no_grad():
        pooled = model.class_layers[:-1](model.features(x))
        return pooled, model.class_layers.out(pooled)


def effidense_outputs(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    with torch.no_grad():
        features = model.forward_features(x)
        return model.forward_head(features, pre_logits=True), model.forward_head(features)


def run_cli(capsys, *args: object) -> tuple[int, str, str]:
    code = cli.main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def to_monai(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return convert.convert_state_dict(state_dict, target="monai").state_dict


# --- part 3: the MONAI layout ---

def test_effidense_to_monai_loads_strictly_computes_the_same_and_comes_back_equal():
    model = tiny_effidense()
    original = model.state_dict()
    conversion = convert.convert_state_dict(original, source="effidense", target="monai")
    assert conversion.target == "monai" and conversion.source == "effidense"
    monai_model = monai_net(2)
    assert list(conversion.state_dict) == list(monai_model.state_dict())  # MONAI's keys, in MONAI's order
    assert "features.denseblock1.denselayer1.layers.norm1.weight" in conversion.state_dict
    assert "class_layers.out.weight" in conversion.state_dict and "classifier.weight" not in conversion.state_dict
    monai_model.load_state_dict(conversion.state_dict, strict=True)

    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    for got, want in zip(monai_outputs(monai_model, x), effidense_outputs(model, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)

    back = convert.convert_state_dict(conversion.state_dict, target="effidense")
    assert back.source == "monai" and any("MONAI key names" in note for note in back.notes)
    assert list(back.state_dict) == list(original)
    for key, value in original.items():
        assert torch.equal(back.state_dict[key], value), key


def test_torchvision_file_to_monai_and_back_through_the_cli(tmp_path, capsys):
    torch.manual_seed(1)
    tv = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                     num_classes=CLASSES)
    tv = randomize(tv, seed=1).float()
    source = tmp_path / "tv.pth"
    torch.save(tv.state_dict(), source)
    monai_file = tmp_path / "monai.pth"
    code, out, err = run_cli(capsys, "--checkpoint", source, "--output", monai_file, "--to", "monai", "--verify")
    assert code == 0, err
    assert "-> monai layout" in out and "verify: max abs" in out
    monai_model = monai_net(2).float()
    monai_model.load_state_dict(torch.load(monai_file, weights_only=True), strict=True)

    back = tmp_path / "tv_again.safetensors"
    code, out, err = run_cli(capsys, "--checkpoint", monai_file, "--output", back, "--from", "monai",
                             "--to", "torchvision", "--verify")
    assert code == 0, err
    assert "monai -> torchvision layout" in out
    restored = convert.load_checkpoint(back).state_dict
    assert sorted(restored) == sorted(tv.state_dict())
    for key, value in tv.state_dict().items():
        assert torch.equal(restored[key], value), key


def test_legacy_torchvision_hub_keys_convert_to_monai_as_monai_renames_them(tmp_path):
    """MONAI's _load_state_dict turns 'denselayer1.norm.1.weight' into 'denselayer1.layers.norm1.weight'; so does
    reading the legacy row of KEY_RULES and writing the MONAI rows, and unlike MONAI nothing is dropped."""
    tv = randomize(torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, bn_size=2,
                                               num_classes=CLASSES))
    legacy = {}
    for key, value in tv.state_dict().items():
        if key.endswith("num_batches_tracked"):
            continue  # the hub files predate the counters
        for name in ("norm1", "norm2", "conv1", "conv2"):
            key = key.replace(f".{name}.", f".{name[:-1]}.{name[-1]}.") if ".denselayer" in key else key
        legacy[key] = value
    assert "features.denseblock1.denselayer1.norm.1.weight" in legacy
    conversion = convert.convert_state_dict(legacy, target="monai")
    assert conversion.source == "torchvision"
    monai_model = monai_net(2)
    monai_model.load_state_dict(conversion.state_dict, strict=True)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(monai_model(x), tv(x), rtol=1e-12, atol=1e-12)


def test_monai_file_with_other_input_channels_converts_with_its_stem(tmp_path, capsys):
    """MONAI's loader drops a stem of another shape without a word; converting keeps it (in_chans read off it)."""
    model = monai_net(2, in_channels=1)
    randomize(model, seed=2)
    source = tmp_path / "monai_1ch.pth"
    torch.save(model.state_dict(), source)
    out_file = tmp_path / "effi.safetensors"
    code, out, err = run_cli(capsys, "--checkpoint", source, "--output", out_file, "--verify")
    assert code == 0, err
    assert "source layout monai (MONAI key names)" in out and "in_chans=1" in out
    effi = effidense.DenseNet(**EFFI_TINY, num_classes=CLASSES, in_chans=1).double().eval()
    effi.load_state_dict(convert.load_checkpoint(out_file).state_dict, strict=True)
    x = torch.randn(2, 1, 32, 32, dtype=torch.float64)
    for got, want in zip(effidense_outputs(effi, x), monai_outputs(model, x), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_monai_weights_load_into_the_timm_model_through_the_key_table(tmp_path):
    import timm

    model = tiny_effidense(seed=3).float()
    path = tmp_path / "monai.pth"
    torch.save(to_monai(model.state_dict()), path)
    loaded = timm.create_model("effi_densenet121", pretrained=True, num_classes=CLASSES, **EFFI_TINY,
                               pretrained_cfg_overlay=dict(file=str(path), num_classes=CLASSES)).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x), rtol=0, atol=0)


def test_bad_monai_keys_are_named_in_the_files_own_names(tmp_path, capsys):
    """Where MONAI's loader silently keeps only what fits, every unknown, missing and mis-shaped key is named, in
    MONAI's names, on one line."""
    state_dict = monai_net(2).state_dict()
    state_dict["features.extra.weight"] = torch.zeros(3)
    del state_dict["features.denseblock2.denselayer1.layers.norm1.running_var"]
    state_dict["class_layers.out.bias"] = torch.zeros(CLASSES + 1)
    with pytest.raises(ConversionError) as info:
        convert.convert_state_dict(state_dict, target="effidense")
    error = info.value
    assert error.unknown == ["features.extra.weight"]
    assert error.missing == ["features.denseblock2.denselayer1.layers.norm1.running_var"]
    assert error.mismatched == [("class_layers.out.bias", (CLASSES + 1,), (CLASSES,))]

    source = tmp_path / "bad.pth"
    torch.save(state_dict, source)
    code, out, err = run_cli(capsys, "--checkpoint", source, "--output", tmp_path / "out.safetensors",
                             "--from", "monai")
    assert code == 1 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    for text in ("1 mis-shaped: class_layers.out.bias [6] (expected [5])",
                 "1 missing: features.denseblock2.denselayer1.layers.norm1.running_var",
                 "1 unknown: features.extra.weight"):
        assert text in err, (text, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.pth"]


def test_monai_prelu_weights_are_refused_in_one_line_that_points_to_the_drop_in(tmp_path, capsys):
    """MONAI's act='prelu' gives each activation a parameter, which no layout convert writes can hold: one line says
    so and names the drop-in, which loads the file as it is; nothing is written."""
    import effidense.monai as em

    torch.manual_seed(0)
    state_dict = monai_nets.DenseNet(2, 1, CLASSES, **MONAI_TINY, act="prelu").state_dict()
    source = tmp_path / "prelu.pth"
    torch.save(state_dict, source)
    code, out, err = run_cli(capsys, "--checkpoint", source, "--output", tmp_path / "out.safetensors")
    assert code == 1 and out == "" and err.count("\n") == 1 and "Traceback" not in err, err
    assert "features.relu0.weight and 10 more" in err and "act='prelu'" in err and "effidense.monai" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prelu.pth"]
    drop_in = em.DenseNet(2, 1, CLASSES, **MONAI_TINY, act="prelu")
    drop_in.load_state_dict(torch.load(source, weights_only=True), strict=True)


def test_monai_cannot_hold_what_its_densenet_lacks(tmp_path):
    small = effidense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, small_inputs=True,
                               num_classes=CLASSES)
    with pytest.raises(ConversionError, match=r"^target layout monai: .*small_inputs=True"):
        convert.convert_state_dict(small.state_dict(), target="monai")
    assert convert.layout_limits("monai", convert.infer_architecture(tiny_effidense().state_dict())) == []


def test_conversion_to_and_from_monai_never_imports_monai(tmp_path):
    code = (
        "import sys; sys.modules['monai'] = None  # any import of monai now fails\n"
        "import effidense\n"
        "from effidense import convert\n"
        "sd = effidense.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8).state_dict()\n"
        "m = convert.convert_state_dict(sd, target='monai').state_dict\n"
        "assert 'class_layers.out.weight' in m\n"
        "assert list(convert.convert_state_dict(m).state_dict) == list(sd)\n"
        "assert convert.inflate(m, method='center')['features.conv0.weight'].dim() == 5\n"
        "arch = convert.infer_architecture(sd)\n"
        "try:\n"
        "    convert.build_layout_model('monai', arch)\n"
        "except convert.ConversionError as e:\n"
        "    print(e)\n"
    )
    result = subprocess.run([sys.executable, "-c", code + QUICK_EXIT], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("building MONAI's DenseNet needs MONAI (pip install monai)")


# --- part 4: 2D -> 3D inflation ---

def inflated_monai_3d(model2d: nn.Module, method: str) -> nn.Module:
    model3d = monai_net(3)
    model3d.load_state_dict(convert.inflate(to_monai(model2d.state_dict()), method=method), strict=True)
    return model3d


def test_center_inflation_is_exact_on_a_depth_constant_input():
    model2d = tiny_effidense(seed=4)
    model3d = inflated_monai_3d(model2d, "center")
    x2d = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    x3d = x2d.unsqueeze(2).expand(-1, -1, 16, -1, -1).contiguous()  # every depth slice is the 2D image
    for got, want in zip(monai_outputs(model3d, x3d), effidense_outputs(model2d, x2d), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_mean_inflation_is_exact_on_interior_slices_only():
    """I3D's mean inflation: on a depth-constant input every interior slice of the feature map is the 2D network's,
    but the 3x3(x3) and 7x7(x7) convolutions' zero padding enters near the first and last slices, so the depth
    borders (and with them the pooled features) differ."""
    model2d = tiny_effidense(seed=5)
    reference2d = monai_net(2)
    reference2d.load_state_dict(to_monai(model2d.state_dict()), strict=True)
    model3d = inflated_monai_3d(model2d, "mean")
    x2d = torch.randn(1, 3, 16, 16, dtype=torch.float64)
    x3d = x2d.unsqueeze(2).expand(-1, -1, 80, -1, -1).contiguous()
    with torch.no_grad():
        want = reference2d.features(x2d)
        got = model3d.features(x3d)  # depth 80 / 8 = 10 slices; the 4 at each end see the padding
    assert got.shape[2] == 10
    for d in range(4, 6):
        torch.testing.assert_close(got[:, :, d], want, rtol=1e-10, atol=1e-10)
    for d in (0, 9):
        assert (got[:, :, d] - want).abs().max() > 1e-3, d
    pooled3d, _ = monai_outputs(model3d, x3d)
    pooled2d, _ = monai_outputs(reference2d, x2d)
    assert (pooled3d - pooled2d).abs().max() > 1e-4


@pytest.mark.parametrize("method", ["mean", "center"])
def test_inflate_torchvision_layout_keeps_keys_and_copies_all_but_kernels(method):
    tv = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=CLASSES)
    state_dict = randomize(tv).state_dict()
    inflated = convert.inflate(state_dict, spatial_dims=3, method=method)
    assert list(inflated) == list(state_dict)
    kernels = 0
    for key, value in state_dict.items():
        new = inflated[key]
        assert new.dtype == value.dtype
        if value.dim() != 4:
            assert torch.equal(new, value) and new.data_ptr() != value.data_ptr(), key  # copied
            continue
        kernels += 1
        k = value.shape[-1]
        assert new.shape == value.shape[:2] + (k,) + value.shape[2:], key
        if method == "center":
            assert torch.equal(new[:, :, k // 2], value), key
            assert not new[:, :, : k // 2].any() and not new[:, :, k // 2 + 1:].any(), key
        else:
            assert torch.equal(new, (value / k).unsqueeze(2).expand_as(new)), key
            torch.testing.assert_close(new.sum(2), value, rtol=1e-12, atol=1e-15)
    assert kernels == 1 + 2 * 4 + 1  # conv0, conv1 + conv2 of 4 layers, transition1
    assert inflated["features.conv0.weight"].shape == (8, 3, 7, 7, 7)


def test_inflate_refuses_bad_input_in_one_line():
    state_dict = tiny_effidense().state_dict()
    with pytest.raises(ConversionError, match=r"^spatial_dims=2: 2D kernels inflate to 3D only"):
        convert.inflate(state_dict, spatial_dims=2)
    with pytest.raises(ConversionError, match=r"^unknown inflation method 'max'; choose one of: mean, center$"):
        convert.inflate(state_dict, method="max")
    inflated = convert.inflate(state_dict)
    with pytest.raises(ConversionError, match=r"^'features.conv0.weight' is 5-d: these are 3D weights already, and "
                                              r"only 2D kernels inflate; convert them without --inflate / inflate"):
        convert.inflate(inflated)
    bad = dict(state_dict)
    bad["features.denseblock1.denselayer2.conv2.weight"] = torch.zeros(4, 8, 5, 5)  # a 5x5 kernel where the net has 3x3
    with pytest.raises(ConversionError) as info:
        convert.inflate(bad)
    assert [k for k, _, _ in info.value.mismatched] == ["features.denseblock1.denselayer2.conv2.weight"]
    assert "\n" not in str(info.value)


def test_cli_inflates_to_a_3d_monai_file(tmp_path, capsys):
    model2d = tiny_effidense(seed=6).float()
    source = tmp_path / "effi2d.pth"
    torch.save(model2d.state_dict(), source)
    out_file = tmp_path / "monai3d.safetensors"
    code, out, err = run_cli(capsys, "--checkpoint", source, "--output", out_file, "--to", "monai",
                             "--inflate", "center")
    assert code == 0, err
    assert "-> monai layout, 3D (center inflation)" in out
    with safe_open(str(out_file), framework="pt") as f:
        meta = f.metadata()
    assert meta["effidense.spatial_dims"] == "3" and meta["effidense.inflation"] == "center"
    assert meta["effidense.layout"] == "monai"
    # the header's architecture is the 3D network's: effidense builds it from the header alone
    arch = convert.Architecture.from_json(meta["effidense.architecture"])
    assert arch.spatial_dims == 3 and "spatial_dims=3" in arch.describe()
    weights, _ = convert.canonical_state_dict(convert.load_checkpoint(out_file).state_dict)
    arch.spec().build().load_state_dict(weights, strict=True)
    # and the one peer builder makes MONAI's 3D DenseNet from it, which takes the file as it is
    convert.build_layout_model("monai", arch).load_state_dict(convert.load_checkpoint(out_file).state_dict)
    model3d = monai_net(3).float()
    model3d.load_state_dict(convert.load_checkpoint(out_file).state_dict, strict=True)
    x2d = torch.randn(1, 3, 32, 32)
    x3d = x2d.unsqueeze(2).expand(-1, -1, 8, -1, -1)
    torch.testing.assert_close(monai_outputs(model3d, x3d)[1], effidense_outputs(model2d, x2d)[1],
                               rtol=1e-5, atol=1e-5)

    # the 3D file is not inflated again (one line, no advice to --inflate), and --verify cannot check an inflation
    code, out, err = run_cli(capsys, "--checkpoint", out_file, "--output", tmp_path / "again.safetensors",
                             "--inflate", "mean")
    assert code == 1 and out == "" and err.count("\n") == 1 and "these are 3D weights already" in err, err
    assert "convert them without --inflate" in err
    with pytest.raises(SystemExit) as info:
        cli.main(["--checkpoint", str(source), "--output", str(tmp_path / "x.pth"), "--inflate", "mean", "--verify"])
    assert info.value.code == 2
    assert "--verify compares models that compute the same function" in capsys.readouterr().err
    with pytest.raises(ConversionError, match="verify compares models that compute the same function"):
        convert.convert_checkpoint(source, tmp_path / "y.pth", inflate="mean", verify=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["effi2d.pth", "monai3d.safetensors"]


def test_2d_conversions_record_their_spatial_dims(tmp_path):
    source = tmp_path / "effi.pth"
    torch.save(tiny_effidense().float().state_dict(), source)
    conversion, _ = convert.convert_checkpoint(source, tmp_path / "out.safetensors", target="monai")
    assert conversion.spatial_dims == 2 and conversion.inflation is None
    meta = convert.load_checkpoint(tmp_path / "out.safetensors").metadata
    assert meta["effidense.spatial_dims"] == "2" and "effidense.inflation" not in meta
    assert convert.Architecture.from_json(meta["effidense.architecture"]).spatial_dims == 2
    assert convert.Architecture.from_json('{"growth_rate": 4, "block_config": [2], "num_init_features": 8}') == \
        convert.Architecture(4, (2,), 8, spatial_dims=2)  # headers written before spatial_dims was recorded

