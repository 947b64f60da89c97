"""An ImageNet start for 2D and 3D MONAI models: effidense.monai's pretrained=True, inflate(..., to=...), convert's
--inflate with --in-chans and --num-classes, MONAI's 3D checkpoints, and the one-line errors around them. Offline:
the weights come from a torchvision cache the tests write in tmp."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch
from conftest import ROOT, load_tool, offline_with_empty_caches
from test_pretrained import randomize, torchvision_cache

import effidense
import effidense.monai as em
from effidense import convert
from effidense.adapt import adapt_input_channels
from effidense.convert import ConversionError
from effidense.weights import canonical_key

cli = load_tool("convert")
TINY = dict(init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2)


@pytest.fixture(scope="module")
def imagenet() -> dict[str, torch.Tensor]:
    """Stand-in ImageNet weights for DenseNet-121: random, with non-trivial BatchNorm statistics."""
    torch.manual_seed(11)
    model = effidense.DenseNet(growth_rate=32, block_config=(6, 12, 24, 16), num_init_features=64)
    return randomize(model).state_dict()


@pytest.fixture
def cached(tmp_path, monkeypatch, imagenet) -> Path:
    """torchvision's densenet121 file in a torchvision cache in tmp (the hub offline and empty)."""
    return torchvision_cache(offline_with_empty_caches(tmp_path, monkeypatch), "densenet121-a639ec97.pth", imagenet)


def test_3d_one_channel_start_is_the_inflated_imagenet_network_with_a_fresh_head(cached, imagenet):
    torch.manual_seed(0)
    model = em.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2, pretrained=True)
    after = torch.rand(1)
    torch.manual_seed(0)
    fresh = em.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)
    assert torch.equal(after, torch.rand(1))  # the generator is where a random start leaves it
    assert model.memory == fresh.memory == "efficient"
    for path, value in model.state_dict().items():  # MONAI's names: 'denselayer1.layers.norm1.weight'
        if path.startswith("class_layers.out."):  # the head: as initialised, not ImageNet's 1000 classes
            assert torch.equal(value, fresh.get_parameter(path)), path
            continue
        source = imagenet[canonical_key(path)]
        if path == "features.conv0.weight":
            source = source.sum(1, keepdim=True)
        if value.dim() == 5:  # I3D's mean: the 2D kernel over k depth taps, divided by k
            k = value.shape[2]
            torch.testing.assert_close(value, source.unsqueeze(2).expand_as(value) / k, rtol=0, atol=0)
        else:
            assert torch.equal(value, source), path
    assert model.eval()(torch.randn(1, 1, 32, 32, 32)).shape == (1, 2)


class _Gain(torch.nn.Module):
    """An activation of one's own with a parameter: ReLU times a learned gain."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((1,), 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(x) * self.weight


@pytest.mark.parametrize(("act", "initial"), [("prelu", 0.25), ((_Gain, {}), 0.5)], ids=["prelu", "one's own"])
def test_learned_activations_keep_their_initial_parameters_as_monais_start_does(cached, imagenet, act,
                                                                                initial):
    """ImageNet's network has no activation weights: as MONAI's pretrained start, they stay as initialised: one
    after each of the 58 layers' two norms, the stem's, the 3 transitions' and norm5 (class_layers.relu)."""
    model = em.DenseNet121(spatial_dims=2, in_channels=3, out_channels=2, act=act, pretrained=True)
    acts = {k: v for k, v in model.state_dict().items() if k.endswith(("relu0.weight", "relu1.weight",
                                                                        "relu2.weight", "relu.weight"))}
    assert len(acts) == 2 * 58 + 1 + 3 + 1 and all(torch.equal(v, torch.tensor([initial])) for v in acts.values())
    assert torch.equal(model.state_dict()["features.denseblock1.denselayer1.layers.norm1.weight"],
                       imagenet["features.denseblock1.denselayer1.norm1.weight"])


@pytest.mark.parametrize("in_channels", [1, 2, 3])
def test_the_stem_on_a_grey_image_computes_the_rgb_network_on_it(cached, in_channels):
    """The documented choice (sum over RGB, shared out): the same grey image in every input channel gives the ImageNet
    network's features on that image in RGB, exactly; averaging would give a third of them."""
    rgb = effidense.densenet121(weights="DEFAULT").eval()
    model = em.DenseNet121(spatial_dims=2, in_channels=in_channels, out_channels=4, pretrained=True).eval()
    grey = torch.randn(2, 1, 64, 64)
    with torch.no_grad():
        want = rgb.forward_head(rgb.forward_features(grey.expand(-1, 3, -1, -1)), pre_logits=True)
        got = model.forward_head(model.forward_features(grey.expand(-1, in_channels, -1, -1)), pre_logits=True)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
    assert model(grey.expand(-1, in_channels, -1, -1)).shape == (2, 4)


def test_adapt_input_channels_sums_and_shares_out():
    weight = torch.randn(4, 3, 7, 7)
    assert torch.equal(adapt_input_channels(weight, 3), weight)
    torch.testing.assert_close(adapt_input_channels(weight, 1), weight.sum(1, keepdim=True))
    two = adapt_input_channels(weight, 2)
    assert two.shape == (4, 2, 7, 7) and torch.equal(two[:, 0], two[:, 1])
    torch.testing.assert_close(two.sum(1), weight.sum(1))
    with pytest.raises(ConversionError, match=r"only RGB \(3-channel\) weights are adapted"):
        adapt_input_channels(torch.randn(4, 2, 7, 7), 1)


def test_offline_without_weights_says_where_it_looked_and_what_to_run(tmp_path, monkeypatch):
    offline_with_empty_caches(tmp_path, monkeypatch)
    with pytest.raises(FileNotFoundError) as raised:
        em.DenseNet169(spatial_dims=3, in_channels=1, out_channels=2, pretrained=True)
    message = str(raised.value)
    assert "\n" not in message
    assert str(tmp_path / "torch" / "hub" / "checkpoints" / "densenet169-b2777c0a.pth") in message
    assert "effidense convert --checkpoint densenet169-b2777c0a.pth --output w.pth --to monai --in-chans 1 " \
           "--num-classes 2 --inflate mean" in message


def test_python_inflate_to_monai_loads_strictly_where_torchvision_names_did_not(imagenet):
    model = em.DenseNet121(spatial_dims=3, in_channels=1, out_channels=2)
    with pytest.raises(em.WeightsMismatchError) as raised:
        model.load_state_dict(convert.inflate(imagenet), strict=False)
    message = str(raised.value)
    assert "keys are in torchvision/timm/effidense names, not MONAI's" in message and "--to monai" in message
    assert "--in-chans 1 --num-classes 2" in message and len(message) < 1000
    model.load_state_dict(convert.inflate(imagenet, to="monai", in_chans=1, num_classes=2), strict=True)
    two_d = convert.inflate(imagenet, to="monai")  # keys only: 3 channels, 1000 classes
    assert "features.denseblock1.denselayer1.layers.norm1.weight" in two_d
    assert two_d["class_layers.out.weight"].shape[0] == 1000


def test_cli_inflate_with_in_chans_and_num_classes_loads_into_monais_own_model(tmp_path, capsys):
    monai_nets = pytest.importorskip("monai.networks.nets")
    tiny2d = randomize(effidense.DenseNet(num_init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2))
    source = tmp_path / "tv.pth"
    torch.save(tiny2d.state_dict(), source)
    out_file = tmp_path / "start.pth"
    code = cli.main(["--checkpoint", str(source), "--output", str(out_file), "--to", "monai", "--inflate", "mean",
                     "--in-chans", "1", "--num-classes", "2"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "note: adapted features.conv0.weight to 1 input channel(s)" in out and "fresh 2-class" in out
    weights = torch.load(out_file, weights_only=True)
    monai_nets.DenseNet(spatial_dims=3, in_channels=1, out_channels=2, **TINY).load_state_dict(weights, strict=True)
    em.DenseNet(3, 1, 2, **TINY).load_state_dict(weights, strict=True)
    # the same from Python, head included (seeded)
    same = convert.inflate(tiny2d.state_dict(), method="mean", to="monai", in_chans=1, num_classes=2)
    assert list(same) == list(weights) and all(torch.equal(same[k], weights[k]) for k in weights)
    for bad, words in ((["--in-chans", "0"], "--in-chans: must be at least 1, got 0"),
                       (["--num-classes", "-1"], "--num-classes: must be 0 or more, got -1"),
                       (["--in-chans", "1", "--verify"], "--verify compares models that compute the same function")):
        with pytest.raises(SystemExit):
            cli.main(["--checkpoint", str(source), "--output", str(tmp_path / "x.pth"), *bad])
        assert words in capsys.readouterr().err


def test_monai_3d_checkpoints_convert_to_effidense_and_back_where_the_shapes_allow(tmp_path, capsys):
    monai_nets = pytest.importorskip("monai.networks.nets")
    torch.manual_seed(3)
    monai3d = monai_nets.DenseNet(spatial_dims=3, in_channels=1, out_channels=2, **TINY)
    with torch.no_grad():
        for m in monai3d.modules():
            if isinstance(m, torch.nn.BatchNorm3d):
                m.running_mean.normal_(0, 0.3)
                m.running_var.uniform_(0.5, 1.5)
    source = tmp_path / "monai3d.pth"
    torch.save(monai3d.state_dict(), source)
    effi = tmp_path / "effi3d.safetensors"
    code = cli.main(["--checkpoint", str(source), "--output", str(effi), "--verify"])
    out, err = capsys.readouterr()
    assert code == 0, err
    assert "spatial_dims=3" in out and "monai -> effidense layout" in out and "verify: max abs difference" in out
    loaded = convert.load_checkpoint(effi)
    assert loaded.metadata["effidense.spatial_dims"] == "3"
    effidense.DenseNet(num_init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2, num_classes=2, in_chans=1,
                       spatial_dims=3).load_state_dict(loaded.state_dict, strict=True)
    back = tmp_path / "monai_again.pth"
    assert cli.main(["--checkpoint", str(effi), "--output", str(back), "--to", "monai", "--verify"]) == 0
    capsys.readouterr()
    again = torch.load(back, weights_only=True)
    assert all(torch.equal(again[k], v) for k, v in monai3d.state_dict().items())
    for layout in ("torchvision", "timm"):
        assert cli.main(["--checkpoint", str(source), "--output", str(tmp_path / f"{layout}.pth"), "--to", layout]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"target layout {layout}: " in err and "2D only (spatial_dims=3)" in err


def test_the_recipe_in_docs_3d_works_as_written(cached, tmp_path, monkeypatch, capsys):
    """docs/3d.md's ImageNet start: its Python blocks run, its `effidense convert` line runs, with the torchvision
    file where the recipe names it."""
    section = (ROOT / "docs" / "3d.md").read_text().split("## An ImageNet start", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```(\w+)\n(.*?)```", section, re.S)
    assert [lang for lang, _ in blocks] == ["python", "bash", "python"]
    monkeypatch.chdir(tmp_path)
    (tmp_path / cached.name).write_bytes(cached.read_bytes())
    for lang, code in blocks:
        if lang == "bash":
            args = shlex.split(code.strip())
            assert args[:2] == ["effidense", "convert"]
            assert cli.main(args[2:]) == 0, capsys.readouterr().err
            continue
        scope: dict = {}
        exec(compile(code, "docs/3d.md", "exec"), scope)
        model = scope["model"]
        assert (model.spatial_dims, model.in_chans, model.num_classes) == (3, 1, 2)
        assert model.features.conv0.weight.abs().sum() > 0


def test_the_help_says_convert_handles_monai_in_3d(capsys):
    from effidense.cli import main

    assert main(["--help"]) == 0
    listed = next(line for line in capsys.readouterr().out.splitlines() if line.split()[:1] == ["convert"])
    assert "MONAI (2D and 3D)" in listed
    with pytest.raises(SystemExit) as done:
        main(["convert", "--help"])
    assert done.value.code == 0
    described = " ".join(capsys.readouterr().out.split())
    assert "MONAI (2D and 3D)" in described and "inflate 2D weights to 3D" in described
