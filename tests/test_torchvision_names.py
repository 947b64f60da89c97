"""torchvision's names mean torchvision's maps: fx nodes (``create_feature_extractor``), forward hooks on its module
names, and ``model.features(x)`` give what torchvision's DenseNet gives with the same weights, bitwise, in every
memory mode, in training (running statistics included) and in eval."""
import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import effidense
from effidense import DenseNet

TINY = dict(growth_rate=8, block_config=(2, 2), num_init_features=16, num_classes=5)
MODES = ["plain", "efficient", "frugal"]
# a torchvision name of each kind, and what each holds there
HOOKED = ["features.norm0", "features.relu0", "features.pool0", "features.denseblock1.denselayer2.norm1",
          "features.denseblock1.denselayer2.relu1", "features.denseblock1.denselayer2.relu2",
          "features.denseblock1.denselayer2", "features.denseblock2", "features.transition1.norm",
          "features.transition1.relu", "features.transition1", "features.norm5", "features"]


def _pair(memory: str, **config) -> tuple[torch.nn.Module, DenseNet]:
    torch.manual_seed(0)
    config = dict(TINY, **config)
    reference = torchvision.models.DenseNet(**config)
    model = DenseNet(**config, memory=memory)
    model.load_state_dict(reference.state_dict())
    return reference, model


def _buffers(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.named_buffers()}


def _assert_equal(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    unequal = [k for k in want if not torch.equal(got[k], want[k])]
    assert not unequal, f"differ from torchvision's: {unequal}"


def test_densenet121_has_every_torchvision_node_name():
    ours = get_graph_node_names(effidense.densenet121())
    theirs = get_graph_node_names(torchvision.models.densenet121())
    for mine, tv in zip(ours, theirs, strict=True):  # training, eval
        assert [n for n in tv if n not in mine] == []
        assert [n for n in mine if n not in tv] == ["head_drop"]  # timm's head dropout (p=0 by default)
        assert mine.index("features.relu0") < mine.index("features.pool0") < mine.index("relu") \
            < mine.index("adaptive_avg_pool2d") < mine.index("flatten") < mine.index("classifier")


@pytest.mark.parametrize("memory", MODES)
@pytest.mark.parametrize("training", [False, True])
def test_create_feature_extractor_gives_torchvisions_maps(memory, training):
    reference, model = _pair(memory)
    nodes = get_graph_node_names(reference)[0 if training else 1][1:]  # every node but the input
    x = torch.randn(2, 3, 32, 32)
    got = create_feature_extractor(model, nodes).train(training)(x)
    want = create_feature_extractor(reference, nodes).train(training)(x)
    _assert_equal(got, want)
    # torchvision's ReLU after norm5 runs in place, so its graph's 'features.norm5' output is overwritten; ours too
    assert torch.equal(got["features.norm5"], got["relu"]) and (got["relu"] >= 0).all()
    _assert_equal(_buffers(model), _buffers(reference))  # the running statistics the graphs updated


def test_norm5_alone_is_before_the_relu():
    reference, model = _pair("efficient")
    x = torch.randn(2, 3, 32, 32)
    got = create_feature_extractor(model, ["features.norm5"])(x)["features.norm5"]
    assert (got < 0).any()  # the graph ends at norm5: no ReLU ran
    assert torch.equal(got, create_feature_extractor(reference, ["features.norm5"])(x)["features.norm5"])


@pytest.mark.parametrize("memory", MODES)
def test_forward_hooks_and_features_see_torchvisions_maps(memory):
    """A training step with forward hooks on torchvision's module names: each hook sees torchvision's map, and the
    outputs, input gradients and running statistics are torchvision's; ``model.features(x)`` too."""
    x = torch.randn(2, 3, 32, 32)
    seen: dict[str, dict[str, torch.Tensor]] = {}
    for model in _pair(memory):
        maps = seen.setdefault(type(model).__module__, {})

        def keep(name: str, maps: dict = maps) -> object:
            def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
                maps.setdefault(name, out.detach().clone())  # the first call's: a recomputation's is the same
            return hook

        handles = [model.get_submodule(name).register_forward_hook(keep(name)) for name in HOOKED]
        inputs = x.clone().requires_grad_()
        logits = model(inputs)
        logits.square().sum().backward()
        maps.update(out=logits.detach(), grad=inputs.grad, **_buffers(model))
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            maps["features(x)"] = model.eval().features(x)
    theirs, ours = seen.values()
    assert set(HOOKED) <= ours.keys()
    _assert_equal(ours, theirs)


# modules whose output torchvision's forward does not overwrite in place (a norm's is, by the ReLU after it)
GRADIENT_HOOKED = ["features.conv0", "features.pool0", "features.denseblock1.denselayer2.conv2",
                   "features.denseblock1.denselayer2", "features.denseblock1", "features.transition1.conv",
                   "features.transition1.pool", "features.transition1", "features.denseblock2", "classifier"]
OUTPUT_HOOKED = [*GRADIENT_HOOKED, "features.denseblock1.denselayer2.relu1", "features.norm5", "features"]


@pytest.mark.parametrize("memory", MODES)
@pytest.mark.parametrize("kind", ["full backward hooks", "output gradient hooks"])
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # a dense layer takes a list, as torchvision's
def test_backward_hooks_see_torchvisions_gradients(memory, kind):
    """Full backward hooks (``register_full_backward_hook``, as per-sample-gradient tools use them) and gradient hooks
    on a module's output (``output.register_hook`` from a forward hook, as Grad-CAM does) fire as often as
    torchvision's, with its gradients (a full hook's input and output gradients), in every memory mode; the step's
    gradients stay torchvision's."""
    x = torch.randn(2, 3, 32, 32)
    seen: dict[str, dict] = {}
    for model in _pair(memory):
        grads = seen.setdefault(type(model).__module__, {})

        def keep(name: str, grads: dict = grads) -> object:
            def hook(module: torch.nn.Module, grad_in: tuple, grad_out: tuple) -> None:
                grads.setdefault(name, []).append([g.clone() for g in (*grad_in, *grad_out) if g is not None])
            return hook

        def ask(name: str, grads: dict = grads) -> object:
            def hook(module: torch.nn.Module, args: tuple, out: torch.Tensor) -> None:
                out.register_hook(lambda g: grads.setdefault(name, []).append([g.clone()]))
            return hook

        if kind == "full backward hooks":
            names = GRADIENT_HOOKED
            handles = [model.get_submodule(name).register_full_backward_hook(keep(name)) for name in names]
        else:
            names = OUTPUT_HOOKED
            handles = [model.get_submodule(name).register_forward_hook(ask(name)) for name in names]
        model(x.clone().requires_grad_()).square().sum().backward()  # conv0's input has a gradient, as its hook asks
        for handle in handles:
            handle.remove()
        grads.update({name: [[p.grad]] for name, p in model.named_parameters()})
    theirs, ours = seen.values()
    assert set(names) <= theirs.keys() == ours.keys()
    for name, want in theirs.items():
        assert len(ours[name]) == len(want), name
        assert all(len(a) == len(b) and all(map(torch.equal, a, b)) for a, b in zip(ours[name], want, strict=True)), \
            name


@pytest.mark.parametrize("memory", MODES)
@pytest.mark.parametrize("name", ["features.denseblock1", "features.denseblock1.denselayer2.conv2",
                                  "features.transition1", "features.denseblock2", "features.norm5"])
def test_gradients_with_respect_to_a_hooked_output_are_torchvisions(memory, name):
    """Captum's layer attributions take ``torch.autograd.grad(output, layer_output)`` of an output a forward hook
    caught, in eval mode: torchvision's gradient, bitwise, in every mode."""
    x = torch.randn(2, 3, 32, 32, requires_grad=True)
    grads = []
    for model in _pair(memory):
        caught = []
        handle = model.eval().get_submodule(name).register_forward_hook(
            lambda m, args, out, caught=caught: caught.append(out))
        score = model(x)[:, 1].sum()
        handle.remove()
        grads.append(torch.autograd.grad(score, caught[0])[0])
    assert torch.equal(*grads)


def test_hooks_on_a_pruned_or_monai_model_are_left_alone():
    """Hooking ``features`` of a model pruned for timm's features_only does not run the pruned-away stem pool; MONAI's
    drop-in keeps its activation in ``class_layers.relu`` and its features end at ``norm5``."""
    model = DenseNet(**TINY).eval()
    model.prune_intermediate_layers([0])
    model.features.register_forward_hook(lambda *a: None)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert model.forward_features(x).shape[-1] == 16  # the stem's map, before its max-pool
    from effidense.monai import DenseNet121
    monai = DenseNet121(spatial_dims=2, in_channels=3, out_channels=2, block_config=(1, 1), init_features=8,
                        growth_rate=4).eval()
    assert "relu" not in monai._modules and isinstance(monai.class_layers.relu, torch.nn.ReLU)
    with torch.no_grad():
        assert (monai.features(x) < 0).any() and torch.equal(monai.features(x), monai.forward_features(x))


def test_norms_hand_their_activation_to_the_module_after_them():
    model = copy.deepcopy(DenseNet(**TINY))
    layer = model.features.denseblock1.denselayer1
    assert list(layer._modules) == ["norm1", "relu1", "conv1", "norm2", "relu2", "conv2"]
    assert list(model.features.transition1._modules) == ["norm", "relu", "conv", "pool"]
    assert list(model.features._modules)[:4] == ["conv0", "norm0", "relu0", "pool0"]
    assert all(norm.act is None for norm in model.modules() if isinstance(norm, effidense.layers.NormAct))
    assert not any(k.split(".")[-2].startswith("relu") for k in model.state_dict())  # no keys: parameter-free



def _doubled(module, args, out):
    return out * 2


@pytest.mark.parametrize(("kwargs", "relu_hook"), [
    (dict(norm_layer=lambda c: effidense.BatchNormAct2d(c, act=F.elu)), None),
    ({}, _doubled),
], ids=["elu", "relu-output-doubled-by-a-hook"])
def test_after_a_hooked_features_only_an_unhooked_relu_keeps_just_its_sign(kwargs, relu_hook):
    """Where ``features`` is hooked, the final activation follows it outside, and is kept at a bit a value only where
    it is torch's ReLU with no hooks: another activation (ELU), or a hook that changes the ReLU's output, is followed
    in backward as on the plain model."""
    torch.manual_seed(0)
    base = DenseNet(**TINY, **kwargs, memory="plain")
    x = torch.randn(2, 3, 32, 32)
    grads = {}
    for memory in ("plain", "efficient", "frugal"):
        model = copy.deepcopy(base).set_memory(memory)
        model.features.register_forward_hook(lambda *a: None)
        if relu_hook is not None:
            model.relu.register_forward_hook(relu_hook)
        model(x).square().sum().backward()
        grads[memory] = [p.grad for p in model.parameters()]
    for memory in ("efficient", "frugal"):
        assert all(torch.equal(a, b) for a, b in zip(grads["plain"], grads[memory], strict=True)), memory
