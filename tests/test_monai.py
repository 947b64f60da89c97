"""effidense.monai: MONAI's DenseNet as a drop-in.

MONAI's own DenseNet (monai 1.6) is the reference: the same arguments build the same initial weights, the same keys
load strictly both ways, and training computes the same outputs, gradients and BatchNorm running statistics, in every
memory mode. Measured on CPU (torch 2.14.1): bitwise equal in float64 and in float32, tiny configs and DenseNet-121.
"""
from __future__ import annotations

import copy
import inspect
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from conftest import QUICK_EXIT, ROOT
from torch import nn

import effidense.monai as em
from effidense import MEMORY_MODES
from effidense.layers import INSTANCE_NORM_ACT, SyncBatchNormAct
from effidense.memory import SavedTensorMeter
from effidense.weights import ConversionError

monai_nets = pytest.importorskip("monai.networks.nets")

TINY = dict(init_features=8, growth_rate=4, block_config=(2, 2), bn_size=2)
SIZES = {1: 64, 2: 32, 3: 20}  # inputs per spatial_dims: tiny, yet every block sees more than one position
CLASSES = 3


def pair(spatial_dims: int, seed: int = 0, cls: str = "DenseNet", **kwargs):
    """MONAI's model and ours, built from the same seed with the same arguments."""
    memory = kwargs.pop("memory", "efficient")
    torch.manual_seed(seed)
    theirs = getattr(monai_nets, cls)(spatial_dims, 1, CLASSES, **kwargs)
    torch.manual_seed(seed)
    ours = getattr(em, cls)(spatial_dims, 1, CLASSES, **kwargs, memory=memory)
    return theirs, ours


def batches(spatial_dims: int, dtype: torch.dtype, steps: int = 3, size: int | None = None):
    generator = torch.Generator().manual_seed(1)
    shape = (2, 1, *[size or SIZES[spatial_dims]] * spatial_dims)
    return [(torch.randn(shape, generator=generator, dtype=dtype), torch.randint(0, CLASSES, (2,), generator=generator))
            for _ in range(steps)]


def train(model: nn.Module, data, seed: int = 5):
    """3 SGD steps (momentum): each step's outputs and gradients, then the final state dict."""
    torch.manual_seed(seed)  # dropout masks
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    outputs, grads = [], []
    for x, y in data:
        optimizer.zero_grad()
        out = model(x)
        F.cross_entropy(out, y).backward()
        outputs.append(out.detach().clone())
        grads.append([p.grad.clone() for p in model.parameters()])
        optimizer.step()
    return outputs, grads, model.state_dict()


def assert_same_training(reference, result, exact: bool) -> None:
    (out_a, grads_a, state_a), (out_b, grads_b, state_b) = reference, result
    assert list(state_a) == list(state_b)  # MONAI's keys, in MONAI's order
    pairs = list(zip(out_a, out_b, strict=True))
    pairs += [g for step in zip(grads_a, grads_b, strict=True) for g in zip(*step, strict=True)]
    pairs += [(state_a[k], state_b[k]) for k in state_a]  # weights and BatchNorm running statistics
    for a, b in pairs:
        if exact:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=0, atol=1e-10)


# --- part 1: the drop-in ---

@pytest.mark.parametrize("norm", ["batch", "instance", ("group", {"num_groups": 2})])
@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
def test_seeded_alike_it_starts_from_monais_weights_and_leaves_the_generator_as_monai_does(spatial_dims, norm):
    torch.manual_seed(0)
    theirs = monai_nets.DenseNet(spatial_dims, 1, CLASSES, **TINY, norm=norm)
    after_theirs = torch.get_rng_state()
    torch.manual_seed(0)
    ours = em.DenseNet(spatial_dims, 1, CLASSES, **TINY, norm=norm)
    assert torch.equal(torch.get_rng_state(), after_theirs)
    mine, reference = ours.state_dict(), theirs.state_dict()
    assert list(mine) == list(reference)
    assert all(torch.equal(mine[k], reference[k]) for k in reference)


def test_keys_load_strictly_both_ways_and_parameters_come_in_monais_order():
    theirs, ours = pair(3, **TINY)
    other_theirs, other_ours = pair(3, seed=1, **TINY)
    ours.load_state_dict(other_theirs.state_dict(), strict=True)
    theirs.load_state_dict(other_ours.state_dict(), strict=True)
    for model in (ours, theirs):
        state = model.state_dict()
        assert all(torch.equal(state[k], v) for k, v in other_theirs.state_dict().items())
    assert [name for name, _ in ours.named_parameters()] == [name for name, _ in theirs.named_parameters()]


@pytest.mark.parametrize("spatial_dims", [1, 2, 3])
@pytest.mark.parametrize("dropout_prob", [0.0, 0.2])
def test_module_and_parameter_names_are_monais(spatial_dims, dropout_prob):
    """Code that freezes or groups parameters by name, or aims monai.visualize at a layer by name, works unchanged:
    MONAI's 'denselayer1.layers.norm1', and its 'layers.dropout' module, the one applied."""
    theirs, ours = pair(spatial_dims, dropout_prob=dropout_prob, **TINY)
    assert [n for n, _ in ours.named_modules()] == [n for n, _ in theirs.named_modules()]
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    assert [n for n, _ in ours.named_buffers()] == [n for n, _ in theirs.named_buffers()]
    norm = ours.get_submodule("features.denseblock1.denselayer1.layers.norm1")
    assert norm is ours.features.denseblock1.denselayer1.norm1  # the layer's own code reaches the same module
    if dropout_prob:
        layer = ours.features.denseblock2.denselayer1
        layer.layers.dropout.p = 0.0  # MONAI's module is the dropout applied: off here, the layer is deterministic
        layer.train()
        x = torch.randn(2, layer.layers.norm1.num_features, *(8,) * spatial_dims)
        torch.testing.assert_close(layer(x), layer(x), rtol=0, atol=0)


def test_an_optimizer_state_carries_over_from_monais_model():
    theirs, ours = pair(2, **TINY)
    data = batches(2, torch.float64, steps=2)
    theirs, ours = theirs.double(), ours.double()
    opt_theirs = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9)
    x, y = data[0]
    F.cross_entropy(theirs(x), y).backward()
    opt_theirs.step()
    ours.load_state_dict(theirs.state_dict())
    opt_ours = torch.optim.SGD(ours.parameters(), lr=0.1, momentum=0.9)
    opt_ours.load_state_dict(copy.deepcopy(opt_theirs.state_dict()))  # as saved and loaded: buffers not shared
    x, y = data[1]
    for model, opt in ((theirs, opt_theirs), (ours, opt_ours)):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    reference, result = theirs.state_dict(), ours.state_dict()
    assert list(reference) == list(result) and all(torch.equal(reference[k], result[k]) for k in reference)


def test_the_head_is_monais_class_layers_so_its_cam_works():
    theirs, ours = pair(2, **TINY)
    theirs, ours = theirs.double().eval(), ours.double().eval()
    assert list(ours.class_layers._modules) == list(theirs.class_layers._modules) == ["relu", "pool", "flatten", "out"]
    from monai.visualize import CAM

    x = batches(2, torch.float64, steps=1)[0][0]
    maps = [CAM(nn_module=m, target_layers="class_layers.relu", fc_layers="class_layers.out")(x) for m in (theirs,
                                                                                                           ours)]
    assert torch.equal(maps[0], maps[1])
    with torch.no_grad():  # features end at norm5, before the activation, as MONAI's
        assert torch.equal(ours.forward_features(x), theirs.features(x))
    with torch.no_grad():  # pre_logits: MONAI's class_layers before `out`
        assert torch.equal(ours.forward_head(ours.forward_features(x), pre_logits=True),
                           theirs.class_layers[:-1](theirs.features(x)))


@pytest.mark.parametrize("memory", MEMORY_MODES)
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")
def test_backward_hooks_see_monais_gradients(memory):
    """Full backward hooks and gradient hooks on a module's output (as ``monai.visualize``'s GradCAM puts them) see
    MONAI's gradients on every module but a dense layer and its ``layers`` (docs/3d.md), and but those that MONAI's
    in-place ReLU meets (a norm's output, ``class_layers``' input), where MONAI's own refuse them, in every mode."""
    theirs, ours = pair(3, memory=memory, **TINY)
    ours.load_state_dict(theirs.state_dict())
    names = [name for name, _ in theirs.named_modules() if name not in ("", "features", "class_layers")
             and not name.endswith(".layers") and not name.split(".")[-1].startswith(("denselayer", "norm", "relu"))]
    x, seen = torch.randn(2, 1, SIZES[3], SIZES[3], SIZES[3]), []
    for model in (theirs, ours):
        grads: dict[str, list] = {}
        for name in names:
            module = model.get_submodule(name)
            module.register_full_backward_hook(lambda m, grad_in, grad_out, name=name, grads=grads: grads.setdefault(
                name, []).append([g for g in (*grad_in, *grad_out) if g is not None]))
            module.register_forward_hook(lambda m, args, out, name=name, grads=grads: out.register_hook(
                lambda g: grads.setdefault(f"{name} output", []).append([g])) and None)
        model(x.clone().requires_grad_()).square().sum().backward()
        seen.append(grads)
    assert seen[0].keys() == seen[1].keys() and len(seen[0]) > len(names)
    for name, want in seen[0].items():
        got = seen[1][name]
        assert len(got) == len(want), name
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for g, w in zip(got, want, strict=True)
                   for a, b in zip(g, w, strict=True)), name


@pytest.mark.parametrize("cls", ["DenseNet121", "DenseNet169", "DenseNet201", "DenseNet264"])
def test_named_configs_take_monais_arguments_and_have_its_keys_and_shapes(cls):
    theirs_cls, ours_cls = getattr(monai_nets, cls), getattr(em, cls)
    mine = inspect.signature(ours_cls).parameters
    for name, param in inspect.signature(theirs_cls).parameters.items():
        assert name in mine and mine[name].default == param.default, name
    with torch.device("meta"):
        theirs, ours = theirs_cls(2, 1, 2), ours_cls(2, 1, 2)
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    assert em.densenet121 is em.Densenet121 is em.DenseNet121 and em.Densenet is em.DenseNet


def test_efficient_modes_keep_less_for_backward_on_a_volume():
    saved = {}
    for memory in MEMORY_MODES:
        _, model = pair(3, **TINY, memory=memory)
        x = batches(3, torch.float32, steps=1, size=24)[0][0]
        with SavedTensorMeter(exclude=model) as meter:
            model(x).sum().backward()
        saved[memory] = meter.bytes
    assert saved["frugal"] < saved["efficient"] < saved["plain"]


def test_effidense_monai_needs_no_monai():
    code = (
        "import sys, torch\n"
        "sys.modules['monai'] = None  # importing monai now fails\n"
        "from effidense.monai import DenseNet121\n"
        "m = DenseNet121(3, 1, 2, block_config=(2, 2), init_features=8, growth_rate=4, memory='frugal')\n"
        "m(torch.randn(2, 1, 20, 20, 20)).sum().backward()\n"
        "m.load_state_dict(m.state_dict())\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-c", code + QUICK_EXIT], capture_output=True, text=True, cwd=ROOT,
                            timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


# --- part 2: exact against MONAI ---

@pytest.mark.parametrize("memory", MEMORY_MODES)
@pytest.mark.parametrize("norm", ["batch", "instance", ("instance", {"track_running_stats": True})],
                         ids=["batch", "instance", "instance-running"])
@pytest.mark.parametrize("spatial_dims", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_training_equals_monais_outputs_gradients_and_running_stats(dtype, spatial_dims, norm, memory):
    theirs, ours = pair(spatial_dims, **TINY, norm=norm, dropout_prob=0.2)
    _, weights = pair(spatial_dims, seed=3, **TINY, norm=norm)  # the same weights, not just the same seed
    theirs.load_state_dict(weights.state_dict())
    ours.load_state_dict(weights.state_dict())
    ours.memory = memory
    data = batches(spatial_dims, dtype)
    reference = train(theirs.to(dtype), data)
    # fp32 too is bitwise on CPU: the same kernels (convolution, batch/instance norm, pooling, the head's adaptive
    # average pool, dropout masks) in the same order
    assert_same_training(reference, train(ours.to(dtype), data), exact=True)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_instance_nvfuser_is_instance_norm_as_monai_makes_it_without_apex(spatial_dims):
    norm = ("instance_nvfuser", {"affine": True})
    with pytest.warns(UserWarning, match="InstanceNorm3dNVFuser"):  # MONAI warns too
        theirs, ours = pair(spatial_dims, **TINY, norm=norm)
    assert type(ours.features.norm0) is INSTANCE_NORM_ACT[spatial_dims]
    data = batches(spatial_dims, torch.float64, steps=2)
    assert_same_training(train(theirs.double(), data), train(ours.double(), data), exact=True)
    for build in (em.DenseNet, em.DenseNet121):  # the warning names the user's line, not effidense's
        with pytest.warns(UserWarning, match="InstanceNorm3dNVFuser") as caught:
            build(spatial_dims, 1, CLASSES, norm=norm, **({} if build is em.DenseNet121 else TINY))
        assert [w.filename for w in caught] == [__file__]


@pytest.mark.parametrize("memory", MEMORY_MODES)
def test_syncbatch_norms_are_synchronised_batch_norms_that_train_as_monais(memory):
    """MONAI's 'syncbatch': ``nn.SyncBatchNorm``s (what ``convert_sync_batchnorm`` would make of 'batch', and what
    code looking for one finds), synchronised under torch.distributed (``tests/test_syncbn.py``); in one process,
    bitwise MONAI's training, as torch's SyncBatchNorm is then a BatchNorm."""
    theirs, ours = pair(3, **TINY, norm=("syncbatch", {"momentum": 0.2}), memory=memory)
    norms = [m for m in ours.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is SyncBatchNormAct and m.momentum == 0.2 for m in norms)
    _, converted = pair(3, **TINY, norm=("batch", {"momentum": 0.2}))
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(converted)
    assert [type(m) for m in converted.modules()] == [type(m) for m in ours.modules()]
    data = batches(3, torch.float64)
    assert_same_training(train(theirs.double(), data), train(ours.double(), data), exact=True)


@pytest.mark.parametrize("memory", MEMORY_MODES)
def test_prelu_is_a_module_after_each_norm_with_monais_keys_and_training(memory):
    """MONAI's 'prelu' has a parameter: an ``nn.PReLU`` after each norm, its weight under MONAI's key
    (``layers.relu1.weight``), in MONAI's parameter order; checkpoints load both ways, and training with BatchNorm and
    dropout is bitwise MONAI's in 3D, the PReLU weights' gradients and updates included."""
    theirs, ours = pair(3, **TINY, act="prelu", dropout_prob=0.2, memory=memory)
    _, other = pair(3, seed=3, **TINY, act="prelu")
    with torch.no_grad():
        for name, p in other.named_parameters():
            if name.endswith("relu1.weight") or name.endswith("relu.weight"):
                p.uniform_(0.0, 0.5)  # not the shared initial 0.25: each loads into its own module
    assert "features.denseblock1.denselayer1.layers.relu1.weight" in ours.state_dict()
    assert [n for n, _ in ours.named_parameters()] == [n for n, _ in theirs.named_parameters()]
    theirs.load_state_dict(other.state_dict(), strict=True)
    ours.load_state_dict(theirs.state_dict(), strict=True)
    data = batches(3, torch.float64)
    assert_same_training(train(theirs.double(), data), train(ours.double(), data), exact=True)


@pytest.mark.parametrize("memory", MEMORY_MODES)
@pytest.mark.parametrize("act", ["relu", "elu"])
def test_backward_after_model_eval_is_monais(memory, act):
    """A training forward, then ``model.eval()`` before backward: MONAI's own gradients (its dropout's masks drawn
    again as drawn in training, reruns in forward's mode), bitwise."""
    theirs, ours = pair(2, **TINY, dropout_prob=0.2, act=act, memory=memory)
    x, runs = torch.randn(2, 1, 32, 32), []
    for model in (theirs, ours):
        torch.manual_seed(5)
        loss = model(x).square().mean()
        model.eval()
        loss.backward()
        runs.append([loss.detach(), *(p.grad for p in model.parameters())])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_1d_signals_train_as_monais():
    theirs, ours = pair(1, **TINY, dropout_prob=0.2)  # MONAI's 1D dropout drops values, not channels
    data = batches(1, torch.float64)
    assert_same_training(train(theirs.double(), data), train(ours.double(), data), exact=False)


def test_densenet121_2d_trains_as_monais_in_fp64():
    theirs, ours = pair(2, cls="DenseNet121")
    data = batches(2, torch.float64, size=32)
    assert_same_training(train(theirs.double(), data), train(ours.double(), data), exact=False)


@pytest.mark.parametrize("act", [("relu", {"inplace": False}), ("leakyrelu", {"negative_slope": 0.2, "inplace": True}),
                                 ("elu", {"alpha": 0.5}), "celu", "selu", "relu6", ("gelu", {"approximate": "tanh"}),
                                 "sigmoid", "tanh", ("swish", {"alpha": 1.5}), "memswish", "mish", "RELU", "",
                                 "prelu", ("prelu", {"init": 0.1}), (nn.LeakyReLU, {"negative_slope": 0.2}),
                                 (nn.PReLU, {"init": 0.1}), (nn.Hardswish, {})])
@pytest.mark.parametrize("memory", ["plain", "efficient"])
def test_every_monai_activation_and_group_norm_compute_monais_function(act, memory):
    theirs, ours = pair(2, **TINY, act=act, norm=("group", {"num_groups": 2}), memory=memory)
    data = batches(2, torch.float64, steps=1)
    assert_same_training(train(theirs.double(), data), train(ours.double(), data), exact=False)


# --- bad input, one line each ---

def one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert "\n" not in message
    return message


@pytest.mark.parametrize("kwargs, words", [
    (dict(norm="layer"), "norm='layer': MONAI's 'layer' is not supported"),
    (dict(norm=("syncbatch", {"num_groups": 2})), "unknown argument 'num_groups'"),
    (dict(norm="nosuch"), "norm='nosuch': unknown norm; choose one of 'batch', 'syncbatch', 'instance', 'group'"),
    (dict(norm=("batch", {"foo": 1})), "unknown argument 'foo'"),
    (dict(norm="group"), "group norm needs num_groups"),
    (dict(norm=("group", {"num_groups": 3})), "cannot normalise 8 channels"),
    (dict(act=("prelu", {"alpha": 1})), "unknown argument 'alpha' (num_parameters, init, device, dtype accepted)"),
    (dict(act="nosuch"), "act='nosuch': unknown activation"),
    (dict(act=("elu", {"beta": 1})), "unknown argument 'beta' (alpha, inplace accepted)"),
    (dict(act=(nn.LeakyReLU, {"slope": 0.2})), "unknown argument 'slope' (negative_slope, inplace accepted)"),
    (dict(act=42), "act=42: expected a name or (name, {arguments})"),
    (dict(spatial_dims=4), "spatial_dims must be 1, 2 or 3, got 4"),
    (dict(spatial_dims=0), "spatial_dims must be 1, 2 or 3, got 0"),
    (dict(bn_size=None), "bn_size must be a positive integer"),
    (dict(out_channels=0), "out_channels must be a positive integer"),
    (dict(in_channels=0), "in_channels must be a positive integer, got 0"),
    (dict(init_features=2.5), "init_features must be a positive integer, got 2.5"),
    (dict(dropout_prob=1.0), "dropout_prob must be a number in [0, 1), got 1.0"),
    (dict(block_config=()), "block_config must be a non-empty sequence"),
])
def test_bad_arguments_get_one_line(kwargs, words):
    args = dict(spatial_dims=3, in_channels=1, out_channels=2, **TINY) | kwargs
    with pytest.raises(ValueError) as error:
        em.DenseNet(**args)
    assert words in one_line(error)


@pytest.mark.parametrize("cls, kwargs, words", [
    ("DenseNet264", {}, "there are no ImageNet weights for DenseNet-264"),
    ("DenseNet121", dict(spatial_dims=1), "ImageNet weights start 2D and 3D models (inflated), not spatial_dims=1"),
    ("DenseNet169", dict(norm="instance"), "so norm must be 'batch' (or 'syncbatch'), not 'instance'"),
])
def test_pretrained_without_weights_to_give_is_refused_before_any_work(cls, kwargs, words):
    # refused before the weights are looked for: no cache is read, no hub asked (tests/test_imagenet_start.py
    # loads them)
    with pytest.raises(ValueError, match="pretrained=True") as error:
        getattr(em, cls)(**{"spatial_dims": 3, "in_channels": 1, "out_channels": 2, **kwargs}, pretrained=True)
    assert words in one_line(error)
    getattr(em, cls)(2, 1, 2, block_config=(1, 1), init_features=4, growth_rate=2, pretrained=False, progress=False)


def test_bad_volumes_get_one_line():
    model = em.DenseNet(3, 1, 2, **TINY)
    with pytest.raises(ValueError) as error:
        model(torch.randn(2, 1, 20, 20))
    assert one_line(error) == ("expected an input of shape (N, 1, D, H, W), got (2, 1, 20, 20) (spatial_dims=3)")
    least = model.min_input_size
    model(torch.randn(2, 1, least, least, least))
    with pytest.raises(ValueError) as error:
        model(torch.randn(2, 1, least, least, least - 1))
    assert f"needs at least {least}x{least}x{least}" in one_line(error)


def test_2d_weights_for_a_3d_model_are_named_in_one_line():
    weights = monai_nets.DenseNet(2, 1, 2, **TINY).state_dict()
    with pytest.raises(WeightsMismatch) as error:
        em.DenseNet(3, 1, 2, **TINY).load_state_dict(weights)
    message = one_line(error)
    assert "10 mis-shaped: features.conv0.weight [8, 1, 7, 7] (expected [8, 1, 7, 7, 7])" in message
    assert "features.denseblock1.denselayer1.layers.conv1.weight" in message and "--inflate" in message
    assert isinstance(error.value, RuntimeError) and isinstance(error.value, ConversionError)


WeightsMismatch = em.WeightsMismatchError


def test_missing_and_unknown_keys_are_named_in_monais_names():
    model = em.DenseNet(2, 1, 2, **TINY)
    weights = model.state_dict()
    gone = "features.denseblock2.denselayer1.layers.norm2.running_var"
    weights.pop(gone)
    weights["class_layers.out.extra"] = torch.zeros(1)
    with pytest.raises(WeightsMismatch) as error:
        model.load_state_dict(weights)
    assert one_line(error).endswith(f"1 missing: {gone}; 1 unknown: class_layers.out.extra")
    result = model.load_state_dict(weights, strict=False)
    assert result.missing_keys == [gone] and result.unexpected_keys == ["class_layers.out.extra"]


def test_effidense_module_paths_are_not_monai_keys():
    model = em.DenseNet(2, 1, 2, **TINY)
    weights = model.state_dict()
    ours = "features.denseblock1.denselayer1.norm1.weight"
    weights[ours] = weights.pop("features.denseblock1.denselayer1.layers.norm1.weight")
    result = model.load_state_dict(weights, strict=False)
    assert result.unexpected_keys == [ours]
    assert result.missing_keys == ["features.denseblock1.denselayer1.layers.norm1.weight"]


def test_inside_another_model_keys_and_torchs_own_errors_use_monais_names():
    outer = nn.Sequential(em.DenseNet(2, 1, 2, **TINY))
    weights = outer.state_dict()
    key = "0.features.denseblock1.denselayer2.layers.conv1.weight"
    assert key in weights
    reference = nn.Sequential(monai_nets.DenseNet(2, 1, 2, **TINY))
    reference.load_state_dict(weights)  # MONAI's own model inside the same container takes them
    outer.load_state_dict(reference.state_dict())
    weights[key] = weights[key][:1]
    with pytest.raises(RuntimeError, match=f"size mismatch for {key}: "):
        outer.load_state_dict(weights)
    del weights[key]
    assert outer.load_state_dict(weights, strict=False).missing_keys == [key]


@pytest.mark.parametrize("mode", ["plain", "efficient", "frugal"])
@pytest.mark.parametrize("model", ["DenseNet121", "DenseNet, small_inputs", "FCDenseNet"])
def test_metatensor_inputs_train_as_plain_tensors(model, mode):
    """MONAI's pipelines hand networks MetaTensors, which copy their attributes onto whatever is computed from them:
    every mode, its backward sliced, gives the gradients and running statistics a plain tensor gives, bitwise
    (float64). A copied attribute once sent frugal's gathered gradients to the wrong maps, and frugal's fused last
    layer failed on MetaTensor.new_empty."""
    from monai.data import MetaTensor

    from effidense import DenseNet, FCDenseNet
    builds = {
        "DenseNet121": lambda: em.DenseNet121(spatial_dims=3, in_channels=1, out_channels=CLASSES, **TINY),
        "DenseNet, small_inputs": lambda: DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8,
                                                   num_classes=CLASSES, spatial_dims=3, in_chans=1,
                                                   small_inputs=True),
        "FCDenseNet": lambda: FCDenseNet(3, 1, CLASSES, down_blocks=(2, 2), up_blocks=(2, 2), bottleneck_layers=2,
                                         growth_rate=4, init_features=8),
    }
    torch.manual_seed(0)
    reference = builds[model]().double()
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    runs = []
    for given in (x, MetaTensor(x.clone(), affine=torch.eye(4), meta={"filename_or_obj": "a.nii.gz"})):
        net = copy.deepcopy(reference).set_memory(mode)
        net.backward_slices = 2
        torch.manual_seed(1)
        net(given).square().mean().backward()
        runs.append([*(p.grad for p in net.parameters()), *net.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("norm", ["batch", "syncbatch"])
@pytest.mark.parametrize(("mode", "slices"), [("plain", 1), ("efficient", 1), ("frugal", 1), ("frugal", 2)])
def test_metatensor_inputs_give_monais_metatensor_logits(mode, slices, norm):
    """MONAI's model hands back a MetaTensor carrying the input's metadata (its meta dict, affine, applied operations,
    batch flag); so does the drop-in in every mode, where a sliced segment computes on the plain tensor too (it
    handed back a plain tensor there), with MONAI's values and gradients (sliced: up to the order of sums)."""
    from monai.data import MetaTensor

    x = MetaTensor(torch.randn(2, 1, 16, 16, 16, dtype=torch.float64), affine=torch.diag(torch.tensor([2., 2, 3, 1])),
                   meta={"filename_or_obj": "a.nii.gz"})
    x.is_batch = True
    x.push_applied_operation({"class": "Spacing", "id": 7})
    torch.manual_seed(0)
    theirs = monai_nets.DenseNet(3, 1, CLASSES, **TINY).double()
    torch.manual_seed(0)
    ours = em.DenseNet(3, 1, CLASSES, **TINY, norm=norm, memory=mode).double()
    ours.backward_slices = slices
    expected, got = theirs(x), ours(x)
    assert type(got) is MetaTensor and got.is_batch
    assert got.applied_operations == expected.applied_operations
    assert got.meta.keys() == expected.meta.keys()
    assert all(torch.equal(got.meta[k], v) if torch.is_tensor(v) else got.meta[k] == v
               for k, v in expected.meta.items())
    assert torch.equal(got.as_tensor(), expected.as_tensor())
    expected.square().sum().backward()
    got.square().sum().backward()
    for a, b in zip(theirs.parameters(), ours.parameters(), strict=True):  # sliced: up to the order of sums
        torch.testing.assert_close(b.grad, a.grad, rtol=0 if slices == 1 else 1e-10, atol=0 if slices == 1 else 1e-12)


def test_metatensor_maps_that_a_fused_transition_cannot_empty_train_as_plain_tensors():
    """Frugal runs a block's last layer with the sliced transition after it, which empties the layer's features once
    normalised; a MetaTensor layer output is a view of what the layer computed (MONAI wraps every result so), which
    autograd forbids emptying, and emptying it would free nothing: the transition then leaves it be. The layer runs
    unsliced (a sliced one hands on a plain tensor), as happens where the transition's rerun outweighs the layer's.
    That run failed with "Output 0 of LightSegment is a view ... modified inplace"."""
    from monai.data import MetaTensor

    from effidense import DenseNet

    torch.manual_seed(0)
    reference = DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=CLASSES,
                         spatial_dims=3, in_chans=1, small_inputs=True, memory="frugal").double()
    reference.backward_slices = 2
    reference.features.denseblock1.denselayer2.backward_slices = 1
    x = torch.randn(2, 1, 16, 16, 16, dtype=torch.float64)
    runs = []
    for given in (x, MetaTensor(x.clone(), affine=torch.eye(4))):
        net = copy.deepcopy(reference)
        net(given).square().mean().backward()
        runs.append([*(p.grad for p in net.parameters()), *net.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
