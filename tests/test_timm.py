"""The timm registry: effi_* entrypoints, pretrained configs and the model API timm's tools rely on."""
from __future__ import annotations

import functools

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.models import group_parameters
from timm.models.densenet import DenseNet as TimmDenseNet
from timm.optim import create_optimizer_v2
from torch import nn

import effidense
from effidense import SavedTensorMeter
from effidense.layers import BATCH_NORM_ACT

NAMES = ["effi_densenet121", "effi_densenet161", "effi_densenet169", "effi_densenet201", "effi_densenet264",
         "effi_densenet40_k12", "effi_densenet_bc100_k12", "effi_densenet_bc250_k24", "effi_densenet_bc190_k40"]
CIFAR = {"effi_densenet40_k12", "effi_densenet_bc100_k12", "effi_densenet_bc250_k24", "effi_densenet_bc190_k40"}
TINY = dict(growth_rate=4, block_config=(2, 2, 2), num_init_features=8)


def tiny(name: str = "effi_densenet121", **kwargs) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, **{**TINY, **kwargs})


def test_registry_lists_every_model_with_tags():
    assert sorted(timm.list_models("effi_*")) == sorted(NAMES)
    tagged = set(timm.list_models("effi_*", include_tags=True))
    for name in ("effi_densenet121", "effi_densenet161", "effi_densenet169", "effi_densenet201"):
        assert f"{name}.tv_in1k" in tagged
    assert "effi_densenet121.ra_in1k" in tagged
    assert timm.create_model("effi_densenet121", **TINY).pretrained_cfg["tag"] == "tv_in1k"  # the default tag


@pytest.mark.parametrize("name", NAMES)
def test_pretrained_cfg(name):
    cfg = timm.models.get_pretrained_cfg(name).to_dict()
    for key in ("input_size", "mean", "std", "crop_pct", "interpolation", "first_conv", "classifier", "num_classes"):
        assert key in cfg, key
    assert cfg["first_conv"] == "features.conv0" and cfg["classifier"] == "classifier"
    if name in CIFAR:
        assert cfg["input_size"] == (3, 32, 32) and cfg["num_classes"] == 10 and cfg["pool_size"] == (8, 8)
    else:
        assert cfg["input_size"] == (3, 224, 224) and cfg["num_classes"] == 1000 and cfg["pool_size"] == (7, 7)


@pytest.mark.parametrize("name", NAMES)
def test_full_models_have_the_published_parameter_counts(name):
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = timm.create_model(name)
        reference = {
            "effi_densenet264": lambda: TimmDenseNet(growth_rate=32, block_config=(6, 12, 64, 48)),
        }.get(name, getattr(torchvision.models, name.removeprefix("effi_"), None))
        expected = sum(p.numel() for p in reference().parameters()) if reference else None
    count = sum(p.numel() for p in model.parameters())
    if expected is None:  # Huang et al., Table 2 (CIFAR, 10 classes), in millions
        expected = {"effi_densenet40_k12": 1.0e6, "effi_densenet_bc100_k12": 0.8e6,
                    "effi_densenet_bc250_k24": 15.3e6, "effi_densenet_bc190_k40": 25.6e6}[name]
        assert abs(count - expected) / expected < 0.05
    else:
        assert count == expected


@pytest.mark.parametrize("name", NAMES)
def test_every_model_runs_a_tiny_batch(name):
    model = tiny(name, num_classes=5).eval()
    size = 32 if name in CIFAR else 64
    assert model.small_inputs == (name in CIFAR)
    with torch.no_grad():
        assert model(torch.randn(2, 3, size, size)).shape == (2, 5)


def test_head_options():
    x = torch.randn(2, 3, 64, 64)
    model = tiny(num_classes=0).eval()
    assert model(x).shape == (2, model.num_features) and isinstance(model.get_classifier(), nn.Identity)
    model = tiny(num_classes=0, global_pool="").eval()
    assert model(x).shape == (2, model.num_features, 4, 4)  # 64 / reduction 16
    model = tiny(in_chans=1).eval()
    assert model.features.conv0.in_channels == 1 and model(torch.randn(2, 1, 64, 64)).shape == (2, 1000)
    model = tiny(global_pool="catavgmax", num_classes=4).eval()
    pre = model.forward_head(model.forward_features(x), pre_logits=True)
    assert pre.shape == (2, model.head_hidden_size) and model.head_hidden_size == 2 * model.num_features
    with pytest.raises(ValueError, match=r"global_pool='' \(no pooling\) needs num_classes=0"):
        tiny(global_pool="")


def test_kwargs_pass_through_create_model():
    assert tiny().memory == "efficient"
    assert tiny(memory="frugal").memory == "frugal"
    assert tiny(efficient=False).memory == "plain"
    model = tiny(drop_rate=0.25, proj_drop_rate=0.1)  # timm's meanings: head dropout, per-layer dropout
    assert model.head_drop.p == 0.25
    assert {layer.drop_rate for layer in model.modules() if isinstance(layer, effidense.densenet.DenseLayer)} == {0.1}
    with pytest.raises(ValueError, match="memory must be one of"):
        tiny(memory="tiny")


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_bn_momentum_and_bn_eps_set_every_batch_norm_as_timms_train_py_passes_them(spatial_dims):
    """timm's train.py passes --bn-momentum and --bn-eps to create_model as bn_momentum and bn_eps (its EfficientNets
    and MobileNets take them; its DenseNet fails): every norm is BatchNorm with them, and trains as one built so."""
    model = tiny(bn_momentum=0.01, bn_eps=1e-3, spatial_dims=spatial_dims)
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    assert norms and all(type(m) is BATCH_NORM_ACT[spatial_dims] and (m.momentum, m.eps) == (0.01, 1e-3)
                         for m in norms)
    given = tiny(bn_momentum=0.01, spatial_dims=spatial_dims).double()  # tiny() seeds: the same weights
    built = tiny(spatial_dims=spatial_dims,
                 norm_layer=functools.partial(BATCH_NORM_ACT[spatial_dims], momentum=0.01)).double()
    x = torch.randn(2, 3, *(32,) * spatial_dims, dtype=torch.float64)
    for model in (given, built):
        model(x).square().sum().backward()
    assert all(torch.equal(a, b) for a, b in zip(given.state_dict().values(), built.state_dict().values(), strict=True))
    assert all(torch.equal(a.grad, b.grad) for a, b in zip(given.parameters(), built.parameters(), strict=True))
    with pytest.raises(ValueError, match=r"bn_momentum and bn_eps are BatchNorm's arguments, beside "
                                         r"norm_layer='groupnorm'"):
        tiny(bn_momentum=0.01, norm_layer="groupnorm")


def test_forward_intermediates_match_forward_features():
    for name, size in (("effi_densenet121", 64), ("effi_densenet_bc100_k12", 32)):
        model = tiny(name).eval()
        x = torch.randn(2, 3, size, size)
        with torch.no_grad():
            final, intermediates = model.forward_intermediates(x)
            torch.testing.assert_close(final, model.forward_features(x), rtol=0, atol=0)
            assert len(intermediates) == len(model.feature_info)
            for feature, info in zip(intermediates, model.feature_info, strict=True):
                assert feature.shape == (2, info["num_chs"], size // info["reduction"], size // info["reduction"])
            torch.testing.assert_close(intermediates[-1], final, rtol=0, atol=0)
            only = model.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
            torch.testing.assert_close(only, [intermediates[0], intermediates[2]], rtol=0, atol=0)
            last, taken = model.forward_intermediates(x, indices=1, stop_early=True)  # the last map only
            torch.testing.assert_close(taken, [intermediates[-1]], rtol=0, atol=0)
            last, taken = model.forward_intermediates(x, indices=[1], stop_early=True)
            torch.testing.assert_close([last], [intermediates[1]], rtol=0, atol=0)


@pytest.mark.skipif(not hasattr(TimmDenseNet, "forward_intermediates"),
                    reason="timm's own DenseNet has forward_intermediates from timm 1.0.31 on: nothing to compare with")
def test_intermediates_equal_timms_densenet():
    """Same weights in timm's DenseNet and ours give the same feature maps for every index."""
    torch.manual_seed(0)
    reference = TimmDenseNet(growth_rate=4, block_config=(2, 2, 2), num_classes=3).eval()
    model = timm.create_model("effi_densenet121", **TINY, num_classes=3).eval()
    model.load_state_dict(reference.state_dict())
    # The same maps; only the names of the modules that make them differ: timm's norm0 and norm5 include their ReLU,
    # ours are torchvision's (before it), followed by the modules relu0 and relu.
    same_map = {"features.norm0": "features.relu0", "features.norm5": "relu"}
    assert [dict(i) for i in model.feature_info] == [
        dict(i, module=same_map.get(i["module"], i["module"])) for i in reference.feature_info]
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_intermediates(x, intermediates_only=True),
                                   reference.forward_intermediates(x, intermediates_only=True), rtol=0, atol=1e-6)
        hooks = timm.create_model("effi_densenet121", **TINY, features_only=True, feature_cls="hook",
                                  out_indices=(0, 1, 2, 3)).eval()  # timm's hooks on the feature_info modules
        # its modules by timm's flattened names, as timm's own DenseNet's hook features
        hooks.load_state_dict({k.replace("features.", "features_", 1): v for k, v in model.state_dict().items()
                               if not k.startswith("classifier")})
        torch.testing.assert_close(hooks(x), reference.forward_intermediates(x, intermediates_only=True), rtol=0,
                                   atol=1e-6)
        torch.testing.assert_close(model(x), reference(x), rtol=0, atol=1e-6)


@pytest.mark.parametrize("mode,slices", [("plain", 1), ("efficient", 1), ("frugal", 1), ("frugal", 2)])
def test_intermediates_are_on_the_networks_path(mode, slices):
    """As in timm's DenseNet, later layers read each intermediate map: the gradient of the logits with respect to it
    (Grad-CAM's) is the whole network's, here torchvision's, whose blocks hand on their outputs."""
    torch.manual_seed(0)
    reference = torchvision.models.DenseNet(4, (2, 2, 2), 8, num_classes=3)
    model = effidense.DenseNet(4, (2, 2, 2), 8, num_classes=3, memory=mode, backward_slices=slices)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 64, 64)
    expected, y = [], x
    for name, module in reference.features.named_children():
        y = module(y)
        if name in ("relu0", "denseblock1", "denseblock2"):
            expected.append(y)
    expected.append(torch.relu(y))
    logits = reference.classifier(torch.flatten(F.adaptive_avg_pool2d(expected[-1], 1), 1))
    final, intermediates = model.forward_intermediates(x)
    grads = torch.autograd.grad(model.forward_head(final)[:, 1].sum(), intermediates)
    exact = dict(rtol=0, atol=0) if slices == 1 else {}
    torch.testing.assert_close(grads, torch.autograd.grad(logits[:, 1].sum(), expected), **exact)


@pytest.mark.parametrize("out_indices", [(0, 1, 2, 3), (1, 2), (0,), (3,)])
def test_features_only(out_indices):
    full = tiny().eval()
    model = tiny(features_only=True, out_indices=out_indices).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model(x)
        expected = full.forward_intermediates(x, indices=list(out_indices), intermediates_only=True)
    assert model.feature_info.channels() == [full.feature_info[i]["num_chs"] for i in out_indices]
    assert model.feature_info.reduction() == [full.feature_info[i]["reduction"] for i in out_indices]
    torch.testing.assert_close(features, expected, rtol=0, atol=0)
    # layers after the last wanted map, and the classifier, are pruned away
    assert sum(p.numel() for p in model.parameters()) < sum(p.numel() for p in full.parameters())
    assert not any(name.startswith("classifier.") and p.numel() for name, p in model.model.named_parameters())


@pytest.mark.parametrize("memory", ["plain", "efficient", "frugal"])
def test_features_only_checkpoints_move_to_and_from_timms_densenet(memory):
    """A features_only model's state dict is timm's own DenseNet's (segmentation_models_pytorch saves one in its
    tu- encoders), loads either way, also inside a wrapper, and the two then train alike in every mode."""
    torch.manual_seed(0)
    config = dict(features_only=True, growth_rate=4, block_config=(2, 2, 2), out_indices=(0, 1, 2, 3))
    reference = nn.ModuleDict({"encoder": timm.create_model("densenet121", **config)})
    model = nn.ModuleDict({"encoder": timm.create_model("effi_densenet121", **config, num_init_features=8,
                                                        memory=memory)})
    assert list(model.state_dict()) == list(reference.state_dict())
    assert [name for name, _ in model.named_parameters()] == [name for name, _ in reference.named_parameters()]
    model.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 32, 32)
    for net in (reference, model):
        sum(f.square().sum() for f in net["encoder"](x)).backward()
    for (name, p), q in zip(reference.named_parameters(), model.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=0, atol=0, msg=name)
    again = nn.ModuleDict({"encoder": timm.create_model("densenet121", **config)})
    again.load_state_dict(model.state_dict())  # running statistics updated by our forward, back in timm's model
    torch.testing.assert_close(again.state_dict(), reference.state_dict(), rtol=0, atol=0)
    # the modules' own names load too; a state dict with both names for one tensor is refused
    own = {k.replace("encoder.features_", "encoder.model.features."): v for k, v in reference.state_dict().items()}
    model.load_state_dict(own)
    with pytest.raises(RuntimeError, match="features_conv0.weight.*the DenseNet.s own name.*both name one tensor"):
        model.load_state_dict({**reference.state_dict(), **own})


def test_backward_slices_one_reaches_the_model_through_timm_where_none_does_not():
    """timm.create_model drops arguments set to None, so backward_slices=None leaves 'auto'; 1 slices nothing."""
    maps = [torch.empty(64, 64, 56, 56, device="meta")]  # 49 MiB, which 'auto' slices in frugal mode
    for setting, slices in ((None, 6), (1, 1)):
        model = timm.create_model("effi_densenet121", memory="frugal", backward_slices=setting, device="meta")
        assert model.backward_slices == ("auto" if setting is None else setting)
        assert model.features.denseblock1.denselayer1.slices(maps) == slices


@pytest.mark.parametrize("feature_cls", ["list", "dict", "hook", "fx"])
def test_every_feature_class_has_timms_densenets_names_and_the_default_models_maps(feature_cls):
    """timm's other feature models (the modules in turn, hooks, an fx graph) of an effi_* model name their modules as
    timm's own DenseNet's, and give the default model's maps from the same weights."""
    config = dict(features_only=True, growth_rate=4, block_config=(2, 2, 2), out_indices=(0, 1, 2, 3))
    reference = timm.create_model("densenet121", feature_cls=feature_cls, **config)
    model = timm.create_model("effi_densenet121", feature_cls=feature_cls, num_init_features=8, **config).eval()
    default = timm.create_model("effi_densenet121", num_init_features=8, **config).eval()
    assert list(model.state_dict()) == list(reference.state_dict())
    model.load_state_dict(dict(zip(model.state_dict(), default.state_dict().values(), strict=True)))
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        maps = model(x)
        torch.testing.assert_close(list(maps.values()) if isinstance(maps, dict) else maps, default(x), rtol=0,
                                   atol=1e-6)


def test_features_only_modules_replaced_by_timms_name_are_the_ones_that_run():
    """A norm put in place of one of the features_only model's modules by its timm name (convert_sync_batchnorm,
    assignment) is adopted, exact under recomputation, and is the one that runs; a DataParallel replica runs its own
    modules and leaves the model's alone; train(), eval() and the memory switches reach every module."""
    model = nn.SyncBatchNorm.convert_sync_batchnorm(tiny(features_only=True, out_indices=(0, 1)))
    assert isinstance(model.features_norm0, effidense.SyncBatchNormAct)
    model.features_norm0 = nn.BatchNorm2d(TINY["num_init_features"])
    assert type(model.features_norm0) is effidense.BatchNormAct2d
    calls = []
    model.features_norm0.register_forward_hook(lambda *args: calls.append(1))
    x = torch.randn(2, 3, 32, 32)
    expected = [t.detach() for t in model(x)]
    assert calls == [1]
    # DataParallel's replicate, as it wires the replicas (torch.nn.parallel.replicate), with a replica's weights changed
    replicas = {m: m._replicate_for_data_parallel() for m in model.modules()}
    for module, replica in replicas.items():
        for name, child in module._modules.items():
            setattr(replica, name, replicas[child])
        for name, param in module._parameters.items():  # broadcast copies, on another device
            replica._parameters[name] = None if param is None else param.detach().clone()
    replicas[model.features_conv0]._parameters["weight"] = torch.zeros_like(model.features_conv0.weight)
    assert not torch.equal(replicas[model](x)[0], expected[0])
    torch.testing.assert_close([t.detach() for t in model(x)], expected, rtol=0, atol=0)
    model.set_grad_checkpointing(True)  # as on timm's own features_only models
    assert model.features_denseblock1.denselayer1.memory == "frugal"
    assert model.set_memory("plain").features_denseblock1.denselayer1.memory == "plain"
    assert not model.eval().features_denseblock1.training


def test_features_only_default_indices_follow_the_block_count():
    for name, blocks in (("effi_densenet121", 4), ("effi_densenet_bc100_k12", 3)):
        model = timm.create_model(name, features_only=True, growth_rate=4, block_config=(1,) * blocks,
                                  num_init_features=8)
        assert len(model.feature_info.channels()) == blocks + 1


def test_features_only_small_inputs_and_too_small_images():
    model = tiny("effi_densenet_bc100_k12", features_only=True, out_indices=(0, 1)).eval()
    with torch.no_grad():
        maps = model(torch.randn(1, 3, 2, 2))  # the pruned net needs only its first transition
    assert [m.shape[-1] for m in maps] == [2, 2]
    with pytest.raises(ValueError, match="too small for this DenseNet: needs at least 4x4"):
        tiny("effi_densenet_bc100_k12")(torch.randn(1, 3, 2, 2))


def test_prune_intermediate_layers_directly():
    model = tiny(num_classes=3).eval()
    assert model.prune_intermediate_layers([1], prune_head=False) == [1]
    assert model.num_features == model.feature_info[1]["num_chs"] and model.num_classes == 0
    assert "norm5" not in model.features._modules and "transition1" not in model.features._modules
    with torch.no_grad():
        # as in timm, the pruned head neither pools nor classifies: the output is map 1 itself
        assert model(torch.randn(1, 3, 64, 64)).shape == (1, model.feature_info[1]["num_chs"], 16, 16)
    with pytest.raises(ValueError, match="already pruned away"):
        model.prune_intermediate_layers([3])


def test_forward_head_and_reset_classifier():
    model = tiny(num_classes=7).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        features = model.forward_features(x)
        pre = model.forward_head(features, pre_logits=True)
        assert pre.shape == (2, model.head_hidden_size)
        torch.testing.assert_close(model.classifier(pre), model(x), rtol=0, atol=0)
    model.reset_classifier(3)
    assert model.num_classes == 3 and model.get_classifier().out_features == 3
    model.reset_classifier(0, global_pool="max")
    with torch.no_grad():
        torch.testing.assert_close(model(x), features.amax((2, 3)), rtol=0, atol=0)
    model = tiny().double().train()
    model.reset_classifier(5)
    assert model.classifier.weight.dtype == torch.float64 and model.classifier.training


def test_group_matcher_with_layer_decay():
    model = tiny(num_classes=3)
    coarse = list(group_parameters(model, model.group_matcher(coarse=True)).values())
    # stem, each block with the transition after it, then what no pattern names (final norm, classifier)
    assert [sorted({n.split(".")[1] for n in group}) for group in coarse] == [
        ["conv0", "norm0"], ["denseblock1", "transition1"], ["denseblock2", "transition2"], ["denseblock3"],
        ["bias", "norm5", "weight"]]
    optimizer = create_optimizer_v2(model, "sgd", lr=0.1, layer_decay=0.5)
    seen = [id(p) for group in optimizer.param_groups for p in group["params"]]
    assert sorted(seen) == sorted(id(p) for p in model.parameters()) and len(seen) == len(set(seen))
    scale = {name: group["lr_scale"] for group in optimizer.param_groups for name, p in model.named_parameters()
             if any(p is q for q in group["params"])}
    stem, first, last = (scale["features.conv0.weight"], scale["features.denseblock1.denselayer1.conv1.weight"],
                         scale["features.denseblock3.denselayer2.conv2.weight"])
    assert stem < first < last < scale["classifier.weight"] == 1.0


def test_set_grad_checkpointing_maps_to_memory_modes():
    model = tiny()
    model.set_grad_checkpointing(False)
    assert model.memory == "efficient"  # off: the default, not plain, which keeps the most
    model.set_grad_checkpointing(True)
    assert model.memory == "frugal"  # the default is already efficient: the switch means "save the most"
    # and it really changes what autograd keeps
    x = torch.randn(2, 3, 64, 64)
    saved = {}
    for enable in (False, True):
        model.set_grad_checkpointing(enable)
        with SavedTensorMeter(exclude=model) as meter:
            model(x).sum()
        saved[enable] = meter.bytes
    assert saved[True] < saved[False]


def test_pretrained_without_weights_says_so():
    # the ImageNet tags fetch timm's hub weights (tests/test_pretrained.py); the other models have none
    with pytest.raises(RuntimeError, match="No pretrained weights exist for effi_densenet264"):
        timm.create_model("effi_densenet264", pretrained=True)


def test_pretrained_file_with_new_classes_channels_and_features(tmp_path):
    source_model = tiny().eval()
    path = tmp_path / "w.safetensors"
    from safetensors.torch import save_file

    save_file(source_model.state_dict(), str(path))
    overlay = dict(file=str(path))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        expected = source_model.forward_features(x)
        same = tiny(pretrained=True, pretrained_cfg_overlay=overlay).eval()
        torch.testing.assert_close(same(x), source_model(x), rtol=0, atol=0)
        fresh_head = tiny(pretrained=True, pretrained_cfg_overlay=overlay, num_classes=4).eval()
        torch.testing.assert_close(fresh_head.forward_features(x), expected, rtol=0, atol=0)
        assert fresh_head(x).shape == (2, 4)
        gray = tiny(pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1)
        torch.testing.assert_close(gray.features.conv0.weight,
                                   source_model.features.conv0.weight.sum(1, keepdim=True), rtol=1e-6, atol=1e-6)
        features = tiny(pretrained=True, pretrained_cfg_overlay=overlay, features_only=True).eval()
        torch.testing.assert_close(features(x), source_model.forward_intermediates(x, intermediates_only=True),
                                   rtol=0, atol=0)


@pytest.mark.parametrize("memory", ["plain", "efficient", "frugal"])
def test_timms_freeze_and_unfreeze_train_as_torchvision(memory):
    """timm's ``freeze`` (``FrozenBatchNorm2d`` in place of the first block's norms) and ``unfreeze`` (back to
    ``nn.BatchNorm2d``, which the model adopts as its own exact norm): a training step after each matches
    torchvision's DenseNet put through the same, and running statistics count each step once."""
    from timm.utils import freeze, unfreeze
    torch.manual_seed(0)
    reference = torchvision.models.DenseNet(**TINY, num_classes=5)
    model = effidense.DenseNet(**TINY, num_classes=5, memory=memory)
    model.load_state_dict(reference.state_dict())
    x, steps = torch.randn(2, 3, 32, 32), []
    for net in (reference, model):
        outputs = []
        for change in (freeze, unfreeze):
            change(net, ["features.denseblock1"])
            net.zero_grad()
            out = net(x)
            out.square().sum().backward()
            outputs += [out, *(p.grad for p in net.parameters() if p.grad is not None), *net.buffers()]
        steps.append(outputs)
    assert type(model.features.denseblock1.denselayer1.norm1) is effidense.layers.norm.BatchNormAct2d
    assert len(steps[0]) == len(steps[1])
    assert all(torch.allclose(a.float(), b.float(), rtol=1e-5, atol=1e-6) for a, b in zip(*steps, strict=True))
    assert model.features.denseblock1.denselayer1.norm1.num_batches_tracked == 1  # counted after unfreezing only


@pytest.mark.parametrize(("act_layer", "norm_layer"), [("silu", "batchnorm2d"), ("gelu", "groupnorm1")])
def test_timms_act_layer_and_norm_layer_names_build_timms_densenet(act_layer, norm_layer):
    """timm's DenseNet takes its norm and activation by name; an effi_* model given the same names and timm's weights
    computes timm's function, in every mode: outputs, gradients and running statistics bitwise."""
    torch.manual_seed(0)
    timms = TimmDenseNet(growth_rate=4, block_config=(2, 2), num_classes=3, act_layer=act_layer,
                         norm_layer=norm_layer)
    start = {k: v.clone() for k, v in timms.state_dict().items()}
    x = torch.randn(4, 3, 32, 32)
    expected = timms(x)
    expected.square().sum().backward()
    grads = {n: p.grad for n, p in timms.named_parameters()}
    for memory in ("plain", "efficient", "frugal"):
        model = timm.create_model("effi_densenet121", growth_rate=4, block_config=(2, 2), num_init_features=8,
                                  num_classes=3, act_layer=act_layer, norm_layer=norm_layer, memory=memory)
        model.load_state_dict(start)
        out = model(x)
        out.square().sum().backward()
        assert torch.equal(out, expected), memory
        assert {n: p.grad for n, p in model.named_parameters()}.keys() == grads.keys()
        assert all(torch.equal(p.grad, grads[n]) for n, p in model.named_parameters()), memory
        assert all(torch.equal(b, timms.get_buffer(n)) for n, b in model.named_buffers()), memory


def test_a_frozen_batch_norm_layer_fine_tunes_alike_in_every_mode():
    """torchvision's FrozenBatchNorm2d (``norm_layer='frozenbatchnorm2d'``, as detection backbones are built) never
    changes its buffers, so a rerun reproduces it: every mode trains as plain, bitwise, and the statistics stay."""
    grads, buffers = {}, {}
    x = torch.randn(2, 3, 32, 32)
    for memory in ("plain", "efficient", "frugal"):
        model = tiny(norm_layer="frozenbatchnorm2d", memory=memory, num_classes=3)
        model(x).square().sum().backward()
        grads[memory] = [p.grad for p in model.parameters()]
        buffers[memory] = [b.clone() for b in model.buffers()]
    assert type(model.features.norm0).__name__ == "FrozenBatchNorm2d"
    for memory in ("efficient", "frugal"):
        assert all(torch.equal(a, b) for a, b in zip(grads["plain"], grads[memory], strict=True)), memory
        assert all(torch.equal(a, b) for a, b in zip(buffers["plain"], buffers[memory], strict=True)), memory


def test_device_and_dtype_as_timms_models_take_them():
    """timm's models take ``device`` and ``dtype``: on 'meta' an effi_* model has shapes only, as timm's densenet does;
    in bfloat16 it holds the very weights of the float32 model cast, its batch count still an integer."""
    for name in ("densenet121", "effi_densenet121"):
        model = timm.create_model(name, device="meta")
        assert all(t.is_meta for t in (*model.parameters(), *model.buffers())), name
    made = tiny(dtype=torch.bfloat16)
    cast = tiny().bfloat16()
    assert made.state_dict().keys() == cast.state_dict().keys()
    assert all(torch.equal(a, b) and a.dtype == b.dtype for a, b in zip(
        made.state_dict().values(), cast.state_dict().values(), strict=True))
    assert made.features.norm0.num_batches_tracked.dtype == torch.int64
    with pytest.raises(TypeError, match="only accepts floating point or complex dtypes"):
        tiny(dtype=torch.int64)
