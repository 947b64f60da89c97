"""Structure, named configurations, torchvision compatibility, the memory-mode API and bad input."""
import pytest
import torch
import torchvision
from conftest import TINY

import effidense
from effidense import DenseNet
from effidense.densenet import DenseBlock, DenseLayer, Transition


def _num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("name", ["densenet121", "densenet161", "densenet169", "densenet201"])
def test_named_imagenet_configs_have_torchvision_keys_and_shapes(name):
    ours = getattr(effidense, name)().state_dict()
    theirs = getattr(torchvision.models, name)().state_dict()
    assert list(ours) == list(theirs)
    assert all(ours[k].shape == theirs[k].shape for k in theirs)


def test_densenet264_config():
    model = effidense.densenet264()
    assert len(model.features.denseblock3) == 64 and len(model.features.denseblock4) == 48
    assert model.num_features == 2688


@pytest.mark.parametrize("name, millions", [  # Huang et al., Table 2
    ("densenet40_k12", 1.0), ("densenet_bc100_k12", 0.8), ("densenet_bc250_k24", 15.3), ("densenet_bc190_k40", 25.6)])
def test_cifar_configs_match_paper_parameter_counts(name, millions):
    model = getattr(effidense, name)()
    assert model.num_classes == 10 and model.small_inputs
    assert _num_params(model) / 1e6 == pytest.approx(millions, rel=0.06)


def test_torchvision_weights_load_strictly_and_compute_the_same_function():
    theirs = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5)
    for m in theirs.modules():  # non-trivial BN state so a key mix-up cannot hide
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.uniform_(-0.5, 0.5)
    ours = DenseNet(**TINY)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    for train in (False, True):
        ours.train(train)
        theirs.train(train)
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("kwargs, shape", [
    (dict(), (2, 5)),
    (dict(num_classes=0), (2, 16)),
    (dict(global_pool="max"), (2, 5)),
    (dict(global_pool="", num_classes=0), (2, 16, 4, 4)),
    (dict(in_chans=1), (2, 5)),
])
def test_output_shapes(kwargs, shape):
    model = DenseNet(**{**TINY, **kwargs})
    x = torch.randn(2, model.in_chans, 32, 32)
    assert model(x).shape == shape


def test_plain_densenet_and_small_stem():
    model = DenseNet(growth_rate=4, block_config=(3, 3), num_init_features=8, bn_size=None, compression=1.0,
                     small_inputs=True, num_classes=3)
    layer = model.features.denseblock1.denselayer1
    assert layer.conv1.kernel_size == (3, 3) and not hasattr(layer, "conv2")
    assert model.features.transition1.conv.out_channels == 8 + 3 * 4  # no compression
    assert model(torch.randn(2, 3, 8, 8)).shape == (2, 3)


def test_forward_features_and_head():
    model = DenseNet(**TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, model.num_features, 4, 4)
    assert model.forward_head(feats, pre_logits=True).shape == (2, model.num_features)
    torch.testing.assert_close(model.forward_head(feats), model(x))


def test_memory_mode_api():
    assert DenseNet(**TINY).memory == "efficient"
    assert DenseNet(**TINY, efficient=False).memory == "plain"
    assert DenseNet(**TINY, efficient=True).memory == "efficient"
    assert DenseNet(**TINY, memory="frugal").memory == "frugal"
    model = effidense.densenet_bc100_k12(memory="plain")
    assert model.set_memory("frugal") is model and model.memory == "frugal"
    model.set_memory(efficient=True)
    assert model.memory == "efficient"
    model.set_grad_checkpointing(False)
    assert model.memory == "efficient"  # off: the default, not plain, which keeps the most
    model.set_grad_checkpointing(True)
    assert model.memory == "frugal"  # timm's --grad-checkpointing: the most memory-saving mode
    assert DenseNet(**TINY, memory_efficient=False).memory == "plain"  # torchvision's and timm's spelling
    assert DenseNet(**TINY, memory_efficient=True).memory == "efficient"


def test_torchvision_positional_order_builds_the_same_network():
    """DenseNet(growth_rate, block_config, num_init_features, bn_size, drop_rate, num_classes, memory_efficient)."""
    import torchvision

    args = (32, (6, 12, 24, 16), 64, 4, 0.2, 10, False)
    ours, theirs = DenseNet(*args), torchvision.models.DenseNet(*args)
    assert ours.memory == "plain" and ours.features.denseblock1.denselayer1.drop_rate == 0.2
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    with pytest.raises(TypeError):
        DenseNet(32, (6, 12, 24, 16), 64, 4, 0.2, 10, False, 0.5)  # compression and the rest are keyword-only


@pytest.mark.parametrize("kwargs, argument", [
    (dict(growth_rate=0), "growth_rate"),
    (dict(growth_rate=-4), "growth_rate"),
    (dict(block_config=()), "block_config"),
    (dict(block_config=(2, 0)), r"block_config\[1\]"),
    (dict(compression=0.0), "compression"),
    (dict(compression=1.5), "compression"),
    (dict(drop_rate=1.0), "drop_rate"),
    (dict(drop_rate=-0.1), "drop_rate"),
    (dict(memory="fast"), "memory"),
    (dict(memory="plain", efficient=True), "contradicts"),
    (dict(efficient="yes"), "efficient"),
    (dict(num_init_features=0), "num_init_features"),
    (dict(bn_size=0), "bn_size"),
    (dict(in_chans=0), "in_chans"),
    (dict(num_classes=-1), "num_classes"),
    (dict(compression=0.01), "compression=0.01 leaves transition1 no channels"),
    (dict(compression="0.5"), "compression"),
    (dict(global_pool="foo"), "global_pool='foo'"),
    (dict(small_inputs="yes"), "small_inputs"),
    (dict(compile="yes"), "compile"),
    (dict(memory_efficient="yes"), "memory_efficient"),
    (dict(efficient=True, memory_efficient=False), "contradicts"),
    (dict(memory="plain", memory_efficient=True), "contradicts"),
])
def test_invalid_configuration_names_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        DenseNet(**{**TINY, **kwargs})


@pytest.mark.parametrize("build, message", [
    (lambda: DenseBlock(0, 8, 4), "num_layers must be a positive integer, got 0"),
    (lambda: DenseBlock(-1, 8, 4), "num_layers must be a positive integer, got -1"),
    (lambda: DenseBlock(2.5, 8, 4), "num_layers must be a positive integer, got 2.5"),
    (lambda: DenseBlock(2, 8, 0), "growth_rate must be a positive integer, got 0"),
    (lambda: DenseBlock(2, 0, 4), "num_input_features must be a positive integer, got 0"),
    (lambda: DenseBlock(2, 8, 4, bn_size=0), "bn_size must be a positive integer, got 0"),
    (lambda: DenseBlock(2, 8, 4, drop_rate=2.0), r"drop_rate must be a number in \[0, 1\), got 2.0"),
    (lambda: DenseBlock(2, 8, 4, spatial_dims=4), "spatial_dims must be 1, 2 or 3, got 4"),
    (lambda: DenseLayer(8, 0), "growth_rate must be a positive integer, got 0"),
    (lambda: DenseLayer(8, 4, bn_size=-1), "bn_size must be a positive integer, got -1"),
    (lambda: DenseLayer(0, 4), "num_input_features must be a positive integer, got 0"),
    (lambda: Transition(8, 0), "num_output_features must be a positive integer, got 0"),
    (lambda: Transition(0, 4), "num_input_features must be a positive integer, got 0"),
])
def test_building_blocks_refuse_impossible_sizes(build, message):
    # The public blocks build models of one's own: an empty block or a layer adding no channels must be refused
    # where it is made, as DenseNet refuses its own arguments, not at the first forward (or never).
    with pytest.raises(ValueError, match=message) as caught:
        build()
    assert "\n" not in str(caught.value)
    assert len(DenseBlock(1, 8, 4)) == 1 and DenseLayer(8, 4, bn_size=None).conv1.out_channels == 4


def test_set_memory_rejects_unknown_mode():
    with pytest.raises(ValueError, match="memory must be one of"):
        DenseNet(**TINY).set_memory("cheap")


def test_wrong_channels_and_too_small_input_explain_what_was_expected():
    model = DenseNet(**TINY)  # ImageNet stem: stride 4, then one transition
    with pytest.raises(ValueError, match=r"\(N, 3, H, W\), got \(2, 1, 32, 32\)"):
        model(torch.randn(2, 1, 32, 32))
    with pytest.raises(ValueError, match=r"3x3 .*needs at least 5x5"):
        model(torch.randn(2, 3, 3, 3))
    assert model(torch.randn(2, 3, 5, 5)).shape == (2, 5)
    with pytest.raises(ValueError, match="expected an input of shape"):
        model(torch.randn(3, 32, 32))
