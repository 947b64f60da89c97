"""effidense's DenseNets as MONAI FlexibleUNet backbones (``import effidense.flexunet``): the maps MONAI's decoder
takes, every mode exact, and the ImageNet start in 3D (offline: the weights come from a torchvision cache in tmp)."""
from __future__ import annotations

import copy
import re
import subprocess
import sys

import pytest
import timm
import torch
from conftest import offline_with_empty_caches
from test_pretrained import randomize, torchvision_cache

import effidense
from effidense.adapt import adapt_state_dict

flexible_unet = pytest.importorskip("monai.networks.nets.flexible_unet")
flexunet = pytest.importorskip("effidense.flexunet")


def _unet(spatial_dims: int, **kwargs) -> torch.nn.Module:
    torch.manual_seed(0)
    return flexible_unet.FlexibleUNet(in_channels=1, out_channels=2, backbone="effi-densenet121",
                                      spatial_dims=spatial_dims, **kwargs)


def test_the_encoder_hands_the_decoder_timms_densenet_maps():
    """Registered as MONAI registers its backbones; the five maps at strides 2-32 are those of timm's DenseNet-121
    ``features_only`` model with the same weights, bitwise."""
    backbones = flexible_unet.FLEXUNET_BACKBONE.register_dict
    assert {f"effi-densenet{n}" for n in (121, 169, 201, 264)} <= set(backbones)
    assert backbones["effi-densenet121"]["feature_number"] == 5
    assert backbones["effi-densenet121"]["feature_channel"] == (64, 256, 512, 1024, 1024)
    encoder = _unet(2).encoder.eval()
    theirs = timm.create_model("densenet121", features_only=True, in_chans=1).eval()
    theirs.load_state_dict({key.replace(".", "_", 1): value for key, value in encoder.state_dict().items()})
    x = torch.randn(2, 1, 64, 64)
    ours = encoder(x)
    assert [tuple(t.shape[1:]) for t in ours] == [(64, 32, 32), (256, 16, 16), (512, 8, 8), (1024, 4, 4),
                                                  (1024, 2, 2)]
    assert all(torch.equal(a, b) for a, b in zip(ours, theirs(x), strict=True))


@pytest.mark.parametrize("mode", ["efficient", "frugal"])
def test_every_encoder_mode_trains_the_unet_as_plain(mode):
    """Outputs, gradients and running statistics of the whole FlexibleUNet, its encoder in ``mode``, bitwise its
    encoder in plain mode."""
    reference = _unet(2).double()
    x = torch.randn(2, 1, 64, 64, dtype=torch.float64)
    runs = []
    for memory in ("plain", mode):
        model = copy.deepcopy(reference)
        model.encoder.set_memory(memory)
        out = model(x)
        out.square().sum().backward()
        runs.append([out, *(p.grad for p in model.parameters()), *model.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_pretrained_starts_a_3d_one_channel_encoder_from_imagenet(tmp_path, monkeypatch):
    """MONAI's ImageNet weights are 2D only; ours start a 3D one-channel encoder from torchvision's DenseNet-121,
    inflated by I3D's mean, its stem summed over RGB, as ``effidense.monai``'s DenseNet121 starts."""
    torch.manual_seed(11)
    imagenet = randomize(effidense.DenseNet()).state_dict()
    torchvision_cache(offline_with_empty_caches(tmp_path, monkeypatch), "densenet121-a639ec97.pth", imagenet)
    encoder = _unet(3, pretrained=True).encoder
    expected, _ = adapt_state_dict(imagenet, method="mean", in_chans=1, num_classes=0)
    assert encoder.state_dict().keys() == expected.keys()
    assert all(torch.equal(value, expected[key]) for key, value in encoder.state_dict().items())
    assert encoder(torch.randn(2, 1, 32, 32, 32))[-1].shape == (2, 1024, 1, 1, 1)


def test_pretrained_where_there_are_no_imagenet_weights_is_refused_in_one_line():
    with pytest.raises(ValueError, match="^pretrained=True: there are no ImageNet weights for densenet264; "):
        flexible_unet.FlexibleUNet(1, 2, backbone="effi-densenet264", pretrained=True)


def test_offline_without_weights_the_one_line_recipe_loads_into_the_encoder(tmp_path, monkeypatch):
    """Offline with empty caches, pretrained=True says in one line where it looked and what to run; the command it
    names, run on torchvision's file, writes weights that load into the encoder as the line says."""
    offline_with_empty_caches(tmp_path, monkeypatch)
    with pytest.raises(FileNotFoundError) as raised:
        _unet(3, pretrained=True)
    message = str(raised.value)
    assert "\n" not in message
    command = re.search(r"effidense convert (.*?), then model\.encoder\.load_state_dict", message).group(1)
    assert command == ("--checkpoint densenet121-a639ec97.pth --output w.pth --to effidense --in-chans 1 "
                       "--num-classes 0 --inflate mean")
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(11)
    torch.save(randomize(effidense.DenseNet()).state_dict(), "densenet121-a639ec97.pth")
    assert subprocess.run([sys.executable, "-m", "effidense", "convert", *command.split()]).returncode == 0
    _unet(3).encoder.load_state_dict(torch.load("w.pth", weights_only=True), strict=True)
