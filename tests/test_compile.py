"""torch.compile: regional, one graph for every layer, exact BN buffers, gradients equal to eager."""
import copy

import pytest
import torch
import torch._dynamo
from torch._dynamo.utils import counters

from effidense import DenseNet, SavedTensorMeter

TINY = dict(growth_rate=4, block_config=(1, 1), num_init_features=8, num_classes=3)


def _unique_graphs() -> int:
    return counters["stats"]["unique_graphs"]


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("mode", ["plain", "efficient", "frugal"])
def test_compiled_training_step_matches_eager(mode):
    base = DenseNet(**TINY, drop_rate=0.2)
    x = torch.randn(4, 3, 16, 16)
    models = {}
    for compiled in (False, True):
        model = copy.deepcopy(base).set_memory(mode).set_compile(compiled).train()
        torch.manual_seed(1)
        out = model(x)
        out.square().mean().backward()
        models[compiled] = (model, out)
    (eager, eager_out), (comp, comp_out) = models[False], models[True]
    torch.testing.assert_close(comp_out, eager_out, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(comp.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(comp.named_buffers(), eager.buffers(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, c) and b.item() == 1, name
        else:
            torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7, msg=name)


def test_one_graph_whatever_the_depth():
    """Regional compilation: a deeper net adds no graphs (the same code is not compiled once per layer)."""
    x = torch.randn(2, 3, 16, 16)
    DenseNet(**TINY, memory="efficient", compile=True)(x).sum().backward()
    shallow = _unique_graphs()
    deep = DenseNet(**dict(TINY, block_config=(3, 3)), memory="efficient", compile=True)
    deep(x).sum().backward()
    deep.eval()
    with torch.no_grad():
        deep(x)
    assert shallow <= 2  # the first call specialises, the second makes sizes symbolic
    assert _unique_graphs() <= shallow + 1  # + the eval-mode graph (running statistics)


def test_compile_option_round_trip():
    model = DenseNet(**TINY, compile=True)
    assert model.compile_options == () and model.features.denseblock1.denselayer1.norm1.compile_options == ()
    model.set_compile(False)
    assert model.compile_options is None and model.features.transition1.norm.compile_options is None


@pytest.mark.parametrize("mode", ["efficient", "frugal"])
def test_whole_model_compiles_in_one_graph_and_matches_eager(mode):
    """``torch.compile(model, fullgraph=True)``: checkpoints, the statistics cache and the pooling functions trace."""
    base = DenseNet(**TINY, memory=mode)  # ImageNet stem: max-pool, and a transition's average pool
    x = torch.randn(4, 3, 16, 16)
    runs = []
    for compiled in (False, True):
        model = copy.deepcopy(base).train()
        out = (torch.compile(model, fullgraph=True) if compiled else model)(x)
        out.square().mean().backward()
        runs.append((model, out))
    (eager, eager_out), (comp, comp_out) = runs
    torch.testing.assert_close(comp_out, eager_out, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(comp.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(comp.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7, msg=name)


def test_model_scope_compiles_the_whole_model_in_place_and_can_be_undone():
    """``set_compile(scope="model")`` is nn.Module.compile of the whole model (one traced graph, checkpoints inside);
    ``set_compile(False)`` returns to eager. aot_eager keeps this test quick and, like inductor, applies the norms'
    buffer updates once however checkpoints rerun (AOTAutograd functionalises them)."""
    base = DenseNet(**TINY, memory="efficient")
    x = torch.randn(4, 3, 16, 16)
    model = copy.deepcopy(base).train().set_compile(scope="model", backend="aot_eager", fullgraph=True)
    assert model.compile_scope == "model" and model.compile_options is None  # no regional graphs inside the whole one
    out = model(x)
    out.square().mean().backward()
    assert _unique_graphs() >= 1
    eager = copy.deepcopy(base).train()
    eager_out = eager(x)
    eager_out.square().mean().backward()
    torch.testing.assert_close(out, eager_out, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(model.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(model.named_buffers(), eager.buffers(), strict=True):
        torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7, msg=name)
    graphs = _unique_graphs()
    model.set_compile(False)
    assert model.compile_scope is None and model._compiled_call_impl is None
    model(x)
    assert _unique_graphs() == graphs  # eager again: nothing new traced
    with pytest.raises(ValueError, match="scope must be one of"):
        model.set_compile(scope="everything")
    assert DenseNet(**TINY, compile="model").compile_scope == "model"


def test_whole_model_compile_keeps_the_memory_modes_savings():
    """Compiled whole, each mode still keeps what it keeps eagerly (checkpoints inside the graph), not the plain
    model's activations. Under torch 2.11's dynamo the model once took the traceable plain path when compiled: the
    outputs are the same, so only memory shows it. aot_eager runs AOTAutograd's partitioner without inductor."""
    config = dict(TINY, growth_rate=8, block_config=(3, 3), num_init_features=16)
    x = torch.randn(4, 3, 32, 32)
    kept = {}
    for mode in ("plain", "efficient", "frugal"):
        torch._dynamo.reset()
        model = DenseNet(**config, memory=mode).train()
        compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
        compiled(x).sum().backward()  # compiles forward and backward
        with SavedTensorMeter(exclude=model) as meter:
            compiled(x)
        kept[mode] = meter.bytes
    # How much less is the partitioner's choice (torch 2.15: efficient 0.43x, frugal 0.11x plain; 2.11: 0.29x, 0.20x)
    assert kept["efficient"] < 0.6 * kept["plain"] and kept["frugal"] < 0.6 * kept["plain"], kept


def test_reduce_overhead_mode_trains_exactly_where_the_cpu_can_check():
    """``set_compile(scope="model", mode="reduce-overhead")`` (CUDA graphs on a GPU, awaiting GPU evidence; on the
    CPU inductor compiles without them): two training steps match eager, running statistics included."""
    base = DenseNet(**TINY, memory="efficient")
    x = torch.randn(4, 3, 16, 16)
    compiled = copy.deepcopy(base).train().set_compile(scope="model", mode="reduce-overhead")
    eager = copy.deepcopy(base).train()
    for _ in range(2):  # the second step replays what the first recorded
        outs = []
        for model in (compiled, eager):
            model.zero_grad(set_to_none=True)
            out = model(x)
            out.square().mean().backward()
            outs.append(out.detach().clone())
        torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-6)
        for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
        for (name, b), c in zip(compiled.named_buffers(), eager.buffers(), strict=True):
            torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7, msg=name)
