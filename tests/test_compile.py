"""torch.compile of the whole model: exact BN buffers, outputs and gradients equal to eager, the modes' savings kept."""
import copy
import re

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


def _step(model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)
    out = model(x)
    out.square().mean().backward()
    return out.detach().clone()


def _assert_same_step(compiled: torch.nn.Module, eager: torch.nn.Module, outs: list[torch.Tensor]) -> None:
    # float32's absolute tolerance (assert_close's default) for outputs near zero: inductor's fused kernels sum in
    # another order (torch 2.11's, one FC-DenseNet output of 2,560: 1.4e-6 off at 0.012)
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    for (name, b), c in zip(compiled.named_buffers(), eager.buffers(), strict=True):
        if name.endswith("num_batches_tracked"):  # counted once per step, however the checkpoints rerun
            assert torch.equal(b, c), name
        else:
            torch.testing.assert_close(b, c, rtol=1e-6, atol=1e-7, msg=name)


@pytest.mark.parametrize("mode", ["efficient", "frugal"])
def test_whole_model_compile_with_inductor_trains_like_eager(mode):
    """Inductor, one graph (``fullgraph=True``): the light Functions, checkpoints and pooling functions trace; two
    steps (the second runs the cached graph) match eager, running statistics included. No dropout: inductor draws
    its own random numbers."""
    base = DenseNet(**TINY, memory=mode)  # ImageNet stem: max-pool, and a transition's average pool
    x = torch.randn(4, 3, 16, 16)
    compiled = copy.deepcopy(base).train().set_compile(fullgraph=True)
    eager = copy.deepcopy(base).train()
    for _ in range(2):
        outs = [_step(model, x) for model in (compiled, eager)]
        _assert_same_step(compiled, eager, outs)
    assert _unique_graphs() == 1
    assert compiled.features.norm5.num_batches_tracked.item() == 2


@pytest.mark.parametrize("mode", ["efficient", "frugal"])
def test_a_new_input_size_recompiles_with_symbolic_sizes_and_stays_exact(mode):
    """A second size (a last, smaller batch) recompiles with symbolic sizes, which the light Functions' backward
    traces too. aot_eager: the tracing is the same as inductor's, the second compile takes a second, not a minute."""
    base = DenseNet(**TINY, memory=mode)
    compiled = copy.deepcopy(base).train().set_compile(backend="aot_eager", fullgraph=True)
    eager = copy.deepcopy(base).train()
    for x in (torch.randn(4, 3, 16, 16), torch.randn(3, 3, 24, 20)):
        outs = [_step(model, x) for model in (compiled, eager)]
        _assert_same_step(compiled, eager, outs)
    assert _unique_graphs() == 2


def test_frugal_with_dropout_compiles_and_keeps_its_mask():
    """A compiled graph cannot read the random state that drawing a dropout mask again needs: a light segment's
    dropout then follows it and keeps its mask, and the step is eager's (aot_eager keeps eager's dropout)."""
    base = DenseNet(**TINY, memory="frugal", drop_rate=0.2)
    x = torch.randn(4, 3, 16, 16)
    model = copy.deepcopy(base).train().set_compile(backend="aot_eager", fullgraph=True)
    eager = copy.deepcopy(base).train()
    _assert_same_step(model, eager, [_step(model, x), _step(eager, x)])


def test_set_compile_round_trip_and_the_removed_scope():
    """``set_compile()`` is nn.Module.compile of the whole model, ``set_compile(False)`` eager again; ``scope="model"``
    and ``compile="model"`` still mean the whole model, 'layers' is refused in one line. aot_eager keeps this quick
    and, like inductor, applies the norms' buffer updates once however checkpoints rerun; unlike inductor it keeps
    eager's dropout."""
    base = DenseNet(**TINY, memory="efficient", drop_rate=0.2)
    x = torch.randn(4, 3, 16, 16)
    model = copy.deepcopy(base).train().set_compile(scope="model", backend="aot_eager", fullgraph=True)
    eager = copy.deepcopy(base).train()
    _assert_same_step(model, eager, [_step(model, x), _step(eager, x)])
    graphs = _unique_graphs()
    assert graphs >= 1
    model.set_compile(False)
    assert model._compiled_call_impl is None
    model(x)
    assert _unique_graphs() == graphs  # eager again: nothing new traced
    assert DenseNet(**TINY, compile=True)._compiled_call_impl is not None
    assert DenseNet(**TINY, compile="model")._compiled_call_impl is not None
    removed = "regional compile was removed because it was slower than eager; set_compile() compiles the whole model"
    with pytest.raises(ValueError, match=re.escape(f"scope='layers': {removed}")):
        model.set_compile(scope="layers")
    with pytest.raises(ValueError, match=re.escape(f"compile='layers': {removed}")):
        DenseNet(**TINY, compile="layers")
    with pytest.raises(ValueError, match="^scope must be 'model', got 'everything'$"):
        model.set_compile(scope="everything")


def test_whole_model_compile_keeps_the_memory_modes_savings():
    """Compiled whole, each mode still keeps what it keeps eagerly (checkpoints inside the graph), not the plain
    model's activations. Under torch 2.11's dynamo the model once took the traceable plain path when compiled: the
    outputs are the same, so only memory shows it. aot_eager runs AOTAutograd's partitioner without inductor."""
    # Two layers a block: the partitioner keeps the same share of plain's as with three (torch 2.14: efficient 0.50x,
    # frugal 0.36x either way), in two thirds of the tracing.
    config = dict(TINY, growth_rate=8, block_config=(2, 2), num_init_features=16)
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
    # How much less is the partitioner's choice (three layers a block, torch 2.15: efficient 0.43x, frugal 0.11x plain;
    # 2.11: 0.29x, 0.20x)
    assert kept["efficient"] < 0.6 * kept["plain"] and kept["frugal"] < 0.6 * kept["plain"], kept


@pytest.mark.slow
def test_fcdensenet_compiles_per_input_size_and_trains_like_eager():
    """FC-DenseNet's ``set_compile`` compiles with static sizes (inductor fails on its backward with symbolic ones),
    so an odd second size, which makes the up path crop, compiles anew and still matches eager."""
    from effidense import FCDenseNet

    base = FCDenseNet(2, 3, 5, down_blocks=(1, 1), up_blocks=(1, 1), bottleneck_layers=1, growth_rate=4,
                      init_features=8, drop_rate=0.0, memory="efficient")
    compiled, eager = copy.deepcopy(base).set_compile(), copy.deepcopy(base)
    for x in (torch.randn(2, 3, 16, 16), torch.randn(2, 3, 13, 10)):
        outs = [_step(model, x) for model in (compiled, eager)]
        _assert_same_step(compiled, eager, outs)
    assert _unique_graphs() == 2
