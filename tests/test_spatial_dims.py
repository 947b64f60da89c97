"""DenseNet for 1, 2 and 3 spatial dims: every mode is the plain model bitwise, memory ratios hold, bad input says
what was expected; and the public DenseBlock, used inside a model of one's own."""
import copy
import functools

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

from effidense import DenseBlock, DenseNet, SavedTensorMeter, activation_floor_bytes, saved_activation_bytes
from effidense.layers import BATCH_NORM_ACT, INSTANCE_NORM_ACT, GroupNormAct

TINY_ND = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
SIZES = {1: (64,), 2: (16, 16), 3: (16, 12, 16)}


def _train(model: nn.Module, x: torch.Tensor, steps: int = 3) -> tuple[torch.Tensor, nn.Module]:
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        out.square().mean().backward()
        opt.step()
    return out, model


def _assert_same_training(runs: dict[str, tuple[torch.Tensor, nn.Module]]) -> None:
    out, plain = runs.pop("plain")
    for mode, (other_out, model) in runs.items():
        assert torch.equal(other_out, out), mode
        for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), (mode, name)
            assert torch.equal(p, q), (mode, name)
        for (name, b), c in zip(model.named_buffers(), plain.buffers(), strict=True):
            assert torch.equal(b, c), (mode, name)


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("small_inputs", [False, True])
def test_every_mode_trains_bitwise_like_plain(spatial_dims, small_inputs):
    base = DenseNet(**TINY_ND, spatial_dims=spatial_dims, small_inputs=small_inputs, drop_rate=0.1, memory="plain")
    x = torch.randn(2, 3, *SIZES[spatial_dims])
    runs = {}
    for mode in ("plain", "efficient", "frugal"):
        torch.manual_seed(3)  # the same dropout masks
        runs[mode] = _train(copy.deepcopy(base).set_memory(mode).train(), x)
    assert runs["plain"][0].shape == (2, 3)
    _assert_same_training(runs)


def test_3d_norms_and_convolutions_are_3d_and_state_dict_keys_unchanged():
    model = DenseNet(**TINY_ND, spatial_dims=3)
    assert isinstance(model.features.conv0, nn.Conv3d) and isinstance(model.features.norm0, nn.BatchNorm3d)
    assert isinstance(model.features.denseblock1.denselayer1.conv2, nn.Conv3d)
    assert model.features.denseblock1.denselayer1.conv2.weight.shape[2:] == (3, 3, 3)
    assert model.state_dict().keys() == DenseNet(**TINY_ND).state_dict().keys()
    assert model.min_input_size == DenseNet(**TINY_ND).min_input_size == 5


def _ratios(spatial_dims: int, size: tuple[int, ...]) -> tuple[float, float]:
    model = DenseNet(growth_rate=8, block_config=(6,), num_init_features=16, small_inputs=True,
                     spatial_dims=spatial_dims)
    x = torch.randn(2, 3, *size)
    plain, efficient, frugal = (saved_activation_bytes(model.set_memory(m), x) for m in ("plain", "efficient",
                                                                                         "frugal"))
    return plain / efficient, frugal / activation_floor_bytes(model, x)


def test_memory_ratios_in_3d_match_2d_at_the_same_number_of_positions():
    """16x16 images against 4x8x8 volumes: 256 positions in every map. (A stride-2 stem or a transition divides
    positions by 4 in 2D but by 8 in 3D, so deeper nets only compare map by map.)"""
    (eff_2d, frugal_2d), (eff_3d, frugal_3d) = _ratios(2, (16, 16)), _ratios(3, (4, 8, 8))
    assert eff_2d > 2.5
    assert abs(eff_3d / eff_2d - 1) <= 0.10, (eff_2d, eff_3d)
    assert abs(frugal_3d / frugal_2d - 1) <= 0.10, (frugal_2d, frugal_3d)
    assert frugal_3d <= 1.01  # at the floor


@pytest.mark.parametrize(("spatial_dims", "shape", "message"), [
    (3, (2, 3, 16, 16), r"expected an input of shape \(N, 3, D, H, W\), got \(2, 3, 16, 16\) \(spatial_dims=3\)"),
    (1, (2, 3, 8, 8), r"\(N, 3, L\)"),
    (3, (1, 3, 16, 4, 16), r"input of 16x4x16 is too small for this DenseNet: needs at least 5x5x5"),
])
def test_bad_volumes_say_what_was_expected(spatial_dims, shape, message):
    model = DenseNet(**TINY_ND, spatial_dims=spatial_dims)
    with pytest.raises(ValueError, match=message):
        model(torch.randn(*shape))


@pytest.mark.parametrize("spatial_dims", [0, 4, "3", True, None])
def test_spatial_dims_must_be_one_two_or_three(spatial_dims):
    with pytest.raises(ValueError, match="spatial_dims must be 1, 2 or 3"):
        DenseNet(**TINY_ND, spatial_dims=spatial_dims)


@pytest.mark.parametrize(("config", "message"), [
    (dict(block_config=(10 ** 9,)), "1000000000 dense layers; at most 10000"),
    (dict(block_config=(2 * 10 ** 300, 5)), r"^block_config \(2e\+300, 5\) has 2e\+300 dense layers; at most 10000 "),
    (dict(growth_rate=10 ** 6), r"growth_rate=1000000, block_config=\(2, 2\) makes about .* GiB in float32"),
    # The classifier and the stem are weights too: these allocated petabytes (or failed to) before any check.
    (dict(num_classes=10 ** 14), r"^num_classes=100000000000000 makes about 1.6e\+15 weights .* over the 4.29e\+09 "
                                 r"supported$"),
    (dict(in_chans=10 ** 12), r"^in_chans=1000000000000 makes about .* weights"),
])
def test_absurd_configurations_are_refused_before_allocating(config, message):
    with pytest.raises(ValueError, match=message):
        DenseNet(**dict(TINY_ND, **config))


@pytest.mark.parametrize("small_inputs", [False, True])
def test_double_backward_works_in_every_mode(small_inputs):
    """A gradient penalty (create_graph=True): the light paths differentiate a rerun, as a checkpoint does. First
    gradients are bitwise plain's, second ones equal to rounding, and running statistics are updated once."""
    torch.manual_seed(0)
    base = DenseNet(**TINY_ND, memory="plain", small_inputs=small_inputs)
    x = torch.randn(2, 3, 16, 16)
    runs = {}
    for mode in ("plain", "efficient", "frugal"):
        model = copy.deepcopy(base).set_memory(mode)
        inputs = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(model(inputs).sum(), inputs, create_graph=True)
        grad.square().sum().backward()
        runs[mode] = grad.detach(), inputs.grad, [p.grad for p in model.parameters()], list(model.buffers())
    for mode in ("efficient", "frugal"):
        (grad, penalty, params, buffers), want = runs[mode], runs["plain"]
        assert torch.equal(grad, want[0])
        torch.testing.assert_close(penalty, want[1], rtol=1e-5, atol=1e-7)
        for got, expected in zip(params, want[2], strict=True):
            assert (got is None) == (expected is None)
            if got is not None:
                torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)
        assert all(torch.equal(a, b) for a, b in zip(buffers, want[3], strict=True))


class TinyTiramisu(nn.Module):
    """A model of one's own: a dense block down, a dense block of new features only up, as FC-DenseNet does."""

    def __init__(self, memory: str) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.down = DenseBlock(3, 8, growth_rate=4, memory=memory)
        self.up = DenseBlock(2, 20, growth_rate=4, memory=memory, new_features_only=True)
        self.head = nn.Conv2d(8, 2, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skip = self.down(self.stem(x))  # 8 + 3 * 4 = 20 channels
        y = F.interpolate(F.max_pool2d(skip, 2), scale_factor=2)
        return self.head(self.up(y))  # 2 * 4 = 8 new channels


def test_dense_block_in_a_model_of_ones_own_is_exact_and_lean():
    base = TinyTiramisu("plain")
    x = torch.randn(2, 3, 16, 16)
    runs = {}
    for mode in ("plain", "efficient", "frugal"):
        model = copy.deepcopy(base)
        model.down.memory = model.up.memory = mode
        runs[mode] = _train(model, x)
    assert runs["plain"][0].shape == (2, 2, 16, 16)
    models = {mode: model for mode, (_, model) in runs.items()}
    _assert_same_training(runs)
    kept, features = {}, torch.randn(2, 8, 16, 16, requires_grad=True)
    for mode, model in models.items():
        with SavedTensorMeter(exclude=model) as meter:
            model.down(features * 1)
        kept[mode] = meter.bytes
    assert kept["efficient"] < 0.7 * kept["plain"] and kept["frugal"] < kept["efficient"], kept


def test_dense_block_shapes_and_3d():
    block = DenseBlock(3, 6, growth_rate=5, bn_size=None, spatial_dims=3)
    x = torch.randn(2, 6, 4, 5, 6)
    assert block(x).shape == (2, 6 + 15, 4, 5, 6)
    block.new_features_only = True
    assert block(x).shape == (2, 15, 4, 5, 6)
    assert block.denselayer3.memory == "efficient"
    block.memory = "frugal"
    assert {layer.memory for layer in block.values()} == {"frugal"}
    with pytest.raises(ValueError, match="memory must be one of"):
        block.memory = "cheap"


NORM_LAYERS = {
    "batch + leaky ReLU": dict(norm_layer=lambda c: BATCH_NORM_ACT[3](
        c, act=functools.partial(F.leaky_relu, negative_slope=0.1))),
    "instance": dict(norm_layer=lambda c: INSTANCE_NORM_ACT[3](c, affine=True)),
    "group": dict(norm_layer=lambda c: GroupNormAct(2, c)),
    "torch's BatchNorm3d + SiLU": dict(norm_layer=nn.BatchNorm3d, act_layer=nn.SiLU),
    "torch's GroupNorm": dict(norm_layer=functools.partial(nn.GroupNorm, 2)),
    "torch's InstanceNorm3d with running statistics": dict(
        norm_layer=functools.partial(nn.InstanceNorm3d, affine=True, track_running_stats=True)),
    "timm's names": dict(norm_layer="groupnorm1", act_layer="gelu"),
}


@pytest.mark.parametrize("norm", NORM_LAYERS)
def test_other_norms_activations_and_channel_dropout_stay_exact(norm):
    base = DenseNet(**TINY_ND, spatial_dims=3, **NORM_LAYERS[norm], drop_channels=True, drop_rate=0.3,
                    memory="plain")
    x = torch.randn(2, 3, 16, 16, 16)
    runs = {}
    for mode in ("plain", "efficient", "frugal"):
        torch.manual_seed(5)
        runs[mode] = _train(copy.deepcopy(base).set_memory(mode).train(), x, steps=2)
    _assert_same_training(runs)


def test_a_torch_batch_norm_is_made_exact_and_followed_by_its_activation():
    model = DenseNet(**TINY_ND, spatial_dims=3, norm_layer=nn.BatchNorm3d, act_layer="silu")
    layer = model.features.denseblock1.denselayer1
    assert type(layer.norm1) is BATCH_NORM_ACT[3] and layer.norm1.act is None and type(layer.relu1) is nn.SiLU
    assert type(model.relu) is nn.SiLU and model.relu.inplace
    default = DenseNet(**TINY_ND, norm_layer="batchnorm")
    assert type(default.features.norm0) is BATCH_NORM_ACT[2] and type(default.features.relu0) is nn.ReLU


TIMM_NORM_ACTS = {  # what timm's models take, and the same model in effidense's own terms
    "timm's BatchNormAct2d with SiLU": (
        dict(norm_layer=functools.partial(timm.layers.BatchNormAct2d, act_layer=nn.SiLU)), dict(act_layer="silu")),
    "timm's BatchNormAct2d, act_layer replacing its ReLU": (dict(norm_layer=timm.layers.BatchNormAct2d,
                                                                 act_layer="gelu"), dict(act_layer="gelu")),
    "timm's GroupNormAct with GELU": (
        dict(norm_layer=functools.partial(timm.layers.GroupNormAct, num_groups=2, act_layer=nn.GELU)),
        dict(norm_layer=functools.partial(nn.GroupNorm, 2), act_layer=nn.GELU)),
    "timm's '' for no activation": (dict(act_layer=""), dict(norm_layer=lambda c: BATCH_NORM_ACT[2](c, act=None))),
    "an activation made by a partial": (dict(act_layer=functools.partial(nn.LeakyReLU, negative_slope=0.2)),
                                        dict(norm_layer=lambda c: BATCH_NORM_ACT[2](
                                            c, act=functools.partial(F.leaky_relu, negative_slope=0.2)))),
}


@pytest.mark.parametrize("case", TIMM_NORM_ACTS)
@pytest.mark.parametrize("mode", ["plain", "efficient", "frugal"])
def test_timm_norm_act_layers_and_activation_factories_apply_their_activation_once(case, mode):
    """timm's norm-act layers apply their activation themselves: it becomes the module after the norm (``relu1``),
    with no ReLU of effidense's after it, and their BatchNorm is effidense's. The model trains as the same model in
    effidense's own terms does, bitwise."""
    timm_kwargs, own_kwargs = TIMM_NORM_ACTS[case]
    own, theirs = DenseNet(**TINY_ND, **own_kwargs, memory=mode), DenseNet(**TINY_ND, **timm_kwargs, memory=mode)
    theirs.load_state_dict(own.state_dict())
    assert not any(type(m) is nn.ReLU for m in theirs.modules())
    if "BatchNormAct2d" in case:
        assert type(theirs.features.denseblock1.denselayer1.norm1) is BATCH_NORM_ACT[2]
    x = torch.randn(2, 3, 16, 16)
    _assert_same_training({"plain": _train(own, x, steps=2), mode: _train(theirs, x, steps=2)})


@pytest.mark.parametrize(("kwargs", "message"), [
    (dict(norm_layer="no_such_norm"), "norm_layer='no_such_norm' is not a timm norm name"),
    (dict(act_layer="no_such_act"), "act_layer='no_such_act' is not a timm activation name"),
    (dict(act_layer=F.silu), "act_layer must be a timm activation name ('relu', 'silu', 'gelu', ...), an nn.Module "
                             "class or what makes one (functools.partial(nn.LeakyReLU, negative_slope=0.2)), got "
                             "<function silu"),
    (dict(norm_layer=functools.partial(timm.layers.BatchNormAct2d, act_layer=nn.SiLU), act_layer="gelu"),
     "norm_layer makes its own activation (SiLU(inplace=True)) and act_layer='gelu' another: pass one of them"),
    (dict(norm_layer=lambda c: BATCH_NORM_ACT[3](c, act=F.elu), act_layer="silu"),
     "norm_layer makes its own activation (elu) and act_layer='silu' another: pass one of them"),
])
def test_bad_norm_or_activation_layers_get_one_line(kwargs, message):
    with pytest.raises((TypeError, ValueError)) as info:
        DenseNet(**TINY_ND, spatial_dims=3, **kwargs)
    assert message in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize("mode", ["efficient", "frugal"])
def test_3d_under_bf16_autocast_keeps_plains_dtypes(mode):
    """Under autocast every module's output has plain's dtype (CPU autocast would run a no-grad 3D max-pool in
    float32), and outputs and running statistics are plain's bitwise. (Gradients are not compared bitwise: this CPU's
    bfloat16 3D convolution backward differs between two runs of the plain model itself.)"""
    torch.manual_seed(0)
    base = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3, spatial_dims=3,
                    in_chans=1)
    x = torch.randn(2, 1, 16, 16, 16)
    runs = []
    for memory in ("plain", mode):
        model = copy.deepcopy(base).set_memory(memory)
        dtypes: dict[str, torch.dtype] = {}

        # leaf modules only: a hook on a block or on features would make the model call it as torchvision does
        names = {module: name for name, module in model.named_modules() if not list(module.children())}

        def record(module: nn.Module, args: tuple, out: torch.Tensor, dtypes: dict = dtypes,
                   names: dict = names) -> None:
            dtypes.setdefault(names[module], out.dtype)

        for module in names:
            module.register_forward_hook(record)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        runs.append((out, model, dtypes))
    (out, plain, plain_dtypes), (got, model, dtypes) = runs
    assert dtypes == plain_dtypes and dtypes["features.pool0"] == torch.bfloat16
    assert torch.equal(out, got)
    for (name, b), c in zip(model.named_buffers(), plain.buffers(), strict=True):
        assert torch.equal(b, c), name
