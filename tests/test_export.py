"""torch.fx, timm's and torchvision's fx feature extraction, torch.export, ONNX, torch.jit: the traced graph is the
plain model's (standard BatchNorm), computes what eager computes (outputs, gradients, running statistics), and
tracing itself touches no buffer."""
import copy
import warnings

import pytest
import timm
import torch
from torch.export import Dim
from torchvision.models.feature_extraction import create_feature_extractor

import effidense.registry  # noqa: F401  (registers effi_* with timm)
from effidense import DenseBlock, DenseNet, FCDenseNet
from effidense.layers.recompute import is_tracing

TINY = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=3)
# ImageNet stem and small_inputs stem, bottleneck layers (DenseNet-BC) and not (DenseNet)
CONFIGS = {
    "imagenet-bc": dict(TINY),
    "imagenet-plain": dict(TINY, bn_size=None, compression=1.0),
    "small-bc": dict(TINY, small_inputs=True),
    "small-plain": dict(TINY, bn_size=None, small_inputs=True),
}
SIZE = {False: 32, True: 16}  # input height/width per small_inputs


def _input(config: dict, batch: int = 3) -> torch.Tensor:
    size = SIZE[config.get("small_inputs", False)]
    return torch.randn(batch, 3, size, size)


def _state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


def _assert_same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], exact: bool = True) -> None:
    assert a.keys() == b.keys()
    for name in a:
        if exact or name.endswith("num_batches_tracked"):
            assert torch.equal(a[name], b[name]), name
        else:
            torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-6, msg=name)


def _train_step(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(1)  # same dropout masks in eager and traced runs
    out = model(x)
    out.square().mean().backward()
    return out


def _assert_same_step(traced: torch.nn.Module, eager: torch.nn.Module, out: torch.Tensor, ref: torch.Tensor) -> None:
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    grads = {name: p.grad for name, p in traced.named_parameters()}
    for name, p in eager.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=1e-4, atol=1e-6, msg=name)
    buffers = dict(traced.named_buffers())
    for name, b in eager.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert torch.equal(buffers[name], b) and b.item() == 1, name
        else:
            torch.testing.assert_close(buffers[name], b, rtol=1e-5, atol=1e-6, msg=name)


@pytest.mark.parametrize("name", list(CONFIGS))
@pytest.mark.parametrize("memory", ["efficient", "frugal"])
def test_fx_traced_model_computes_what_eager_computes(name, memory):
    """symbolic_trace in training mode: tracing touches nothing; one traced training step gives eager's outputs,
    gradients and running statistics (batch statistics, one update per norm); eval uses running statistics."""
    config = CONFIGS[name]
    drop_rate = 0.2 if memory == "frugal" else 0.0  # frugal recomputes whole layers, dropout included
    base = DenseNet(**config, drop_rate=drop_rate, head_drop_rate=0.1, memory=memory).train()
    before = _state(base)
    traced = torch.fx.symbolic_trace(base)  # shares base's parameters and buffers
    _assert_same_state(_state(base), before)  # tracing ran nothing
    eager = copy.deepcopy(base)
    x = _input(config)
    _assert_same_step(traced, eager, _train_step(traced, x), _train_step(eager, x))
    # The graph is the plain model's: standard BatchNorm modules, no checkpoint, no effidense autograd functions.
    targets = {str(n.target) for n in traced.graph.nodes if n.op == "call_function"}
    assert not any("checkpoint" in t or "apply" in t for t in targets), targets
    eager.eval()
    x = _input(config)
    with torch.no_grad():
        want = eager(x)
        # Traced in eval mode: running statistics, no dropout.
        torch.testing.assert_close(torch.fx.symbolic_trace(copy.deepcopy(eager))(x), want, rtol=1e-5, atol=1e-6)
        if not drop_rate:
            # BatchNorm and the head's dropout are leaf modules: the training-mode graph switches to eval at run
            # time. (Dense layers' dropout, like torchvision's and timm's, keeps the mode it was traced in.)
            torch.testing.assert_close(traced.eval()(x), want, rtol=1e-5, atol=1e-6)


def test_fx_traced_in_eval_matches_eager_eval():
    model = DenseNet(**CONFIGS["imagenet-bc"]).eval()
    traced = torch.fx.symbolic_trace(model)
    x = _input(CONFIGS["imagenet-bc"])
    with torch.no_grad():
        assert torch.equal(traced(x), model(x))


def _intermediates(model: DenseNet, x: torch.Tensor) -> list[torch.Tensor]:
    return model.forward_intermediates(x, intermediates_only=True)


@pytest.mark.parametrize("name", ["imagenet-bc", "small-plain"])
@pytest.mark.parametrize("training", [False, True])
def test_torchvision_create_feature_extractor(name, training):
    """The module names in feature_info name the maps forward_intermediates returns (after ReLU for the norms)."""
    config = CONFIGS[name]
    model = DenseNet(**config).train(training)
    eager = copy.deepcopy(model)
    return_nodes = [info["module"] for info in model.feature_info]
    before = _state(model)
    extractor = create_feature_extractor(model, return_nodes)
    _assert_same_state(_state(model), before)
    extractor.train(training)
    x = _input(config)
    maps = extractor(x)
    ref = _intermediates(eager, x)
    assert list(maps) == return_nodes and len(ref) == len(return_nodes)
    for (node, got), want in zip(maps.items(), ref, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=node)
    _assert_same_state(_state(model), _state(eager), exact=False)  # one running-statistics update each


@pytest.mark.parametrize("out_indices", [(0,), (0, 1, 2), (2,), (1,)])
@pytest.mark.parametrize("small_inputs", [False, True])
@pytest.mark.parametrize("feature_cls", ["fx", "hook"])
def test_timm_features_only_fx_and_hooks(out_indices, small_inputs, feature_cls):
    """timm's features_only=True with feature_cls='fx' (graph nodes) or 'hook' (forward hooks on the feature_info
    modules) gives the maps of the default getter (forward_intermediates)."""
    config = dict(TINY, small_inputs=small_inputs)
    del config["num_classes"]
    torch.manual_seed(0)
    fx_net = timm.create_model("effi_densenet121", features_only=True, feature_cls=feature_cls,
                               out_indices=out_indices, **config)
    torch.manual_seed(0)
    getter = timm.create_model("effi_densenet121", features_only=True, out_indices=out_indices, **config)
    kind = {"fx": "FeatureGraphNet", "hook": "FeatureHookNet"}[feature_cls]
    assert type(fx_net).__name__ == kind and type(getter).__name__ == "DenseNetFeatures"
    assert fx_net.feature_info.channels() == getter.feature_info.channels()
    x = _input(config)
    for training in (False, True):
        fx_net.train(training)
        getter.train(training)
        got, want = fx_net(x), getter(x)
        assert len(got) == len(want) == len(out_indices)
        for index, a, b in zip(out_indices, got, want, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
            if index == 2 or (index == 0 and not small_inputs):
                assert a.min() >= 0  # the norms' maps are after ReLU


@pytest.mark.parametrize("name", ["imagenet-bc", "small-plain"])
def test_export_eval_with_dynamic_batch(name):
    config = CONFIGS[name]
    model = DenseNet(**config).eval()
    program = torch.export.export(model, (_input(config),), dynamic_shapes={"x": {0: Dim("batch")}})
    exported = program.module()
    for batch in (2, 5):
        x = _input(config, batch)
        with torch.no_grad():
            torch.testing.assert_close(exported(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(CONFIGS))
def test_export_train_step_matches_eager(name):
    """Exported in training mode (dynamic batch): exporting touches no buffer; one step of the exported module at
    another batch size gives eager's outputs, gradients and running statistics."""
    config = CONFIGS[name]
    model = DenseNet(**config).train()
    eager = copy.deepcopy(model)
    before = _state(model)
    program = torch.export.export(model, (_input(config),), dynamic_shapes={"x": {0: Dim("batch")}})
    _assert_same_state(_state(model), before)
    exported = program.module()
    x = _input(config, 5)
    _assert_same_step(exported, eager, _train_step(exported, x), _train_step(eager, x))


@pytest.mark.parametrize("dynamo", [True, False])
def test_onnx_eval_matches_eager(tmp_path, dynamo):
    """ONNX export of an eval model, run by onnxruntime at another batch size than the export's. dynamo=True goes
    through torch.export (needs onnxscript), dynamo=False through torch.jit.trace."""
    pytest.importorskip("onnx")
    ort = pytest.importorskip("onnxruntime")
    if dynamo:
        pytest.importorskip("onnxscript")
    config = CONFIGS["imagenet-bc"]
    model = DenseNet(**config).eval()
    path = tmp_path / "model.onnx"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.onnx's deprecation and progress notes
        if dynamo:
            torch.onnx.export(model, (_input(config),), str(path), dynamo=True, input_names=["x"],
                              dynamic_shapes={"x": {0: Dim("batch")}})
        else:
            torch.onnx.export(model, (_input(config),), str(path), dynamo=False, input_names=["x"],
                              dynamic_axes={"x": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    x = _input(config, 5)
    (out,) = session.run(None, {"x": x.numpy()})
    with torch.no_grad():
        torch.testing.assert_close(torch.from_numpy(out), model(x), rtol=1e-4, atol=1e-5)


def test_jit_trace_eval_matches_eager():
    model = DenseNet(**CONFIGS["small-bc"]).eval()
    x = _input(CONFIGS["small-bc"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.trace's deprecation
        traced = torch.jit.trace(model, (x,))
    x = _input(CONFIGS["small-bc"], 5)
    with torch.no_grad():
        torch.testing.assert_close(traced(x), model(x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("build", [lambda: DenseNet(**TINY), lambda: DenseBlock(2, 8, 4),
                                   lambda: FCDenseNet(2, 3, 2, down_blocks=(2,), up_blocks=(2,))],
                         ids=["DenseNet", "DenseBlock", "FCDenseNet"])
def test_torchscript_scripting_says_it_is_unsupported(build):
    with pytest.raises(RuntimeError, match=r"do not support TorchScript \(torch.jit.script\)") as info, \
            warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit.script's deprecation
        torch.jit.script(build())
    assert "torch.export" in str(info.value) and "use_trace=True" in str(info.value)


def test_only_tracers_take_the_traceable_path():
    """fx, export and jit.trace take the plain graph; eager and torch.compile (whole model included) do not."""
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(is_tracing())
            return x + 1

    x = torch.ones(2)
    Probe()(x)
    torch.compile(Probe(), backend="eager", fullgraph=True)(x)
    assert seen == [False, False]
    torch.fx.symbolic_trace(Probe())
    torch.export.export(Probe(), (x,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.jit.trace(Probe(), (x,), check_trace=False)
    assert seen[2:] == [True, True, True]


def test_compile_is_not_export_where_dynamo_folds_is_exporting(monkeypatch):
    """torch 2.11's dynamo answers is_exporting() True under any torch.compile (the GPU machines run it): only
    torch.export's own flag may send the model down the traceable plain path."""
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    monkeypatch.setattr(torch.compiler, "is_exporting", lambda: True)
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", False)
    assert not is_tracing()
    monkeypatch.setattr(torch.compiler, "_is_exporting_flag", True)
    assert is_tracing()


def test_traced_input_check_still_applies_to_export():
    model = DenseNet(**CONFIGS["imagenet-bc"]).eval()
    with pytest.raises(ValueError, match="too small"):
        torch.export.export(model, (torch.randn(2, 3, 4, 4),))
