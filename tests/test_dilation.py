"""DeepLab's output_stride: dilated later blocks, as segmentation_models_pytorch's DeepLabV3, DeepLabV3+ and PAN ask
timm for them (checked without smp, which effidense does not depend on)."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
import torchvision
from conftest import fused_then_apart
from torch import nn

import effidense
from effidense.densenet import DenseNet
from effidense.dilation import Unpooled, dilate

TINY = dict(growth_rate=4, block_config=(2, 2, 2, 2), num_init_features=8, bn_size=2)


@pytest.mark.parametrize(("output_stride", "sizes"), [(32, [32, 16, 8, 4, 2]), (16, [32, 16, 8, 4, 4]),
                                                      (8, [32, 16, 8, 8, 8])])
def test_output_stride_through_timm_gives_the_maps_smp_asks_for(output_stride, sizes):
    """smp's call: ``timm.create_model(name, features_only=True, output_stride=..., out_indices=(0, ..., 4))``. The
    maps beyond the stride keep its size, and feature_info says so."""
    features = timm.create_model("effi_densenet121", **TINY, features_only=True, output_stride=output_stride,
                                 out_indices=tuple(range(5)))
    x = torch.randn(2, 3, 64, 64)
    assert [t.shape[-1] for t in features(x)] == sizes
    assert features.feature_info.reduction() == [64 // size for size in sizes]
    model = effidense.densenet121(**TINY, num_classes=3, output_stride=output_stride)  # the builders take it too
    assert model.forward_features(x).shape[-1] == sizes[-1]


@pytest.mark.parametrize("output_stride", [16, 8])
def test_dilated_plain_model_is_torchvision_dilated_by_hand(output_stride):
    """DenseASPP's dilated DenseNet: the transitions that would pool below the stride removed, the 3x3 convolutions
    after them dilated 2, then 4; torchvision's DenseNet so changed by hand computes the same, bitwise."""
    torch.manual_seed(0)
    ours = effidense.densenet121(**TINY, num_classes=3, output_stride=output_stride, memory="plain").double()
    theirs = torchvision.models.DenseNet(**TINY, num_classes=3).double()
    theirs.load_state_dict(ours.state_dict())
    dilated = {16: {"denseblock4": 2}, 8: {"denseblock3": 2, "denseblock4": 4}}[output_stride]
    for block, dilation in dilated.items():
        getattr(theirs.features, f"transition{int(block[-1]) - 1}").pool = nn.Identity()
        for layer in getattr(theirs.features, block).values():
            layer.conv2.dilation = layer.conv2.padding = (dilation, dilation)
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    assert torch.equal(ours(x), theirs(x))


def _small(spatial_dims: int, **kwargs) -> DenseNet:
    torch.manual_seed(0)
    return DenseNet(growth_rate=4, block_config=(2, 2, 2), num_init_features=8, num_classes=3,
                    spatial_dims=spatial_dims, drop_rate=0.2, memory="plain", **kwargs).double()


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("output_stride", [4, 8])
@pytest.mark.parametrize(("mode", "slices"), [("efficient", 1), ("frugal", 1), ("frugal", 2)])
def test_every_mode_computes_the_dilated_plain_model(spatial_dims, output_stride, mode, slices):
    """Outputs, gradients and running statistics of the plain dilated model, dropout included: bitwise, or where the
    backward goes through the batch in slices (its unpooled transitions too), within the order of float sums."""
    reference = dilate(_small(spatial_dims), output_stride)
    x = torch.randn(2, 3, *(64 if spatial_dims < 3 else 24,) * spatial_dims, dtype=torch.float64)
    runs = []
    for model in (copy.deepcopy(reference), copy.deepcopy(reference).set_memory(mode)):
        model.backward_slices = slices if model.memory != "plain" else 1
        torch.manual_seed(1)
        out = model(x)
        out.square().sum().backward()
        runs.append([out, *(p.grad for p in model.parameters()), *model.buffers()])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(b, a, rtol=0 if slices == 1 else 1e-10, atol=0 if slices == 1 else 1e-12)


def test_a_frugal_last_layer_with_its_unpooled_transition(monkeypatch):
    """Frugal runs a block's last layer and the sliced transition after it as one segment, which empties the layer's
    features once normalised; unpooled, it is bitwise the two run apart."""
    fused: list[bool] = []
    x, runs = torch.randn(4, 3, 32, 32, dtype=torch.float64), []
    for _ in fused_then_apart(monkeypatch, fused):
        torch.manual_seed(0)
        model = dilate(DenseNet(growth_rate=16, block_config=(4, 1), num_init_features=8, bn_size=None,
                                num_classes=5, small_inputs=True, memory="frugal", backward_slices=2).double(), 1)
        assert isinstance(model.features.transition1.pool, Unpooled)
        out = model(x)
        out.square().sum().backward()
        runs.append([out, *(p.grad for p in model.parameters())])
    assert fused == [True]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("output_stride", [12, 64, 2, True, "16"])
def test_an_output_stride_the_network_cannot_run_at_is_refused_in_one_line(output_stride):
    with pytest.raises(ValueError, match=r"^output_stride must be one of 4, 8, 16, 32 for this DenseNet \(the "
                                         r"strides its blocks run at\), got "):
        timm.create_model("effi_densenet121", **TINY, output_stride=output_stride)


def test_the_tools_build_it_from_their_model_spec_and_the_peers_say_they_cannot():
    """plan, bench and gradcheck take ``--model-kwargs output_stride=...``; torchvision's, timm's and MONAI's DenseNets
    take no output_stride, so the tools leave them out with that reason, but not for the network's own stride."""
    from effidense.harness.variants import peer_limits
    from effidense.modelspec import resolve_model

    spec = resolve_model("effi_densenet121", {**TINY, "output_stride": 8})
    model = spec.build("frugal")
    assert isinstance(model.features.transition3.pool, Unpooled)
    assert model.features.denseblock4.denselayer1.conv2.dilation == (4, 4)
    assert peer_limits("torchvision", spec) == ["it takes no output_stride (output_stride=8)"]
    assert peer_limits("torchvision", resolve_model("effi_densenet121", {**TINY, "output_stride": 32})) == []
    with pytest.raises(ValueError, match="^output_stride must be one of 4, 8, 16, 32"):
        resolve_model("effi_densenet121", {"output_stride": 5})


def test_dilating_again_sets_the_new_stride():
    """A model dilated before is set to the new stride, back to its own (32) too: the same as one dilated once."""
    base = effidense.densenet121(**TINY, num_classes=3, memory="plain").double()
    x = torch.randn(2, 3, 64, 64, dtype=torch.float64)
    for stride in (16, 32):
        again, once = dilate(dilate(copy.deepcopy(base), 8), stride), dilate(copy.deepcopy(base), stride)
        assert torch.equal(again(x), once(x))
        assert again.feature_info == once.feature_info
    assert torch.equal(again(x), base(x))
