"""FC-DenseNet: the paper's architecture, exact in every memory mode, in 2D and 3D, and one line per bad input."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from conftest import Adapted

import effidense
from effidense.fcdensenet import FCDenseNet, fcdensenet56, fcdensenet67, fcdensenet103
from effidense.harness.tiramisu import ReferenceTiramisu
from effidense.layers.norm import GroupNormAct

# Two poolings: inputs need at least 4 positions per axis. Odd sizes make the up path crop.
TINY = dict(down_blocks=(2, 2), up_blocks=(2, 2), bottleneck_layers=2, growth_rate=4, init_features=8)
SIZES = {1: (13,), 2: (13, 10), 3: (9, 6, 7)}


def _step_all(models: dict[str, FCDenseNet], dims: int, steps: int = 3) -> dict[str, list[torch.Tensor]]:
    """``steps`` SGD steps of each model on the same batches, each forward under the same seed (dropout)."""
    opts = {name: torch.optim.SGD(m.parameters(), lr=0.1) for name, m in models.items()}
    outputs: dict[str, list[torch.Tensor]] = {name: [] for name in models}
    for step in range(steps):
        gen = torch.Generator().manual_seed(step)
        x = torch.randn(2, 2, *SIZES[dims], generator=gen)
        y = torch.randint(0, 3, (2, *SIZES[dims]), generator=gen)
        for name, model in models.items():
            torch.manual_seed(100 + step)
            out = model(x)
            F.cross_entropy(out, y).backward()
            outputs[name] += [out.detach(), *(p.grad.clone() for p in model.parameters())]
            opts[name].step()
            opts[name].zero_grad()
    return outputs


@pytest.mark.parametrize("dims", [2, 3])
def test_efficient_and_frugal_are_bitwise_plain_after_three_sgd_steps(dims: int) -> None:
    plain = FCDenseNet(dims, 2, 3, **TINY, memory="plain")
    models = {"plain": plain}
    for mode in ("efficient", "frugal"):
        models[mode] = FCDenseNet(dims, 2, 3, **TINY, memory=mode)
        models[mode].load_state_dict(plain.state_dict())
    outputs = _step_all(models, dims)
    for mode in ("efficient", "frugal"):
        assert all(torch.equal(a, b) for a, b in zip(outputs["plain"], outputs[mode], strict=True)), mode
        for (key, a), b in zip(plain.state_dict().items(), models[mode].state_dict().values(), strict=True):
            assert torch.equal(a, b), (mode, key)  # weights, running statistics, batch counts
    assert plain.state_dict()["down.0.denselayer1.norm1.num_batches_tracked"] == 3


@pytest.mark.parametrize("mode", ["efficient", "frugal"])
@pytest.mark.filterwarnings("ignore:Full backward hook is firing")  # a transition down takes a list of maps
def test_backward_hooks_fire_as_in_plain(mode: str) -> None:
    """A full backward hook and a gradient hook on a module's output (from a forward hook) fire with plain's
    gradients, on the classifier (which frugal otherwise runs where autograd does not record), a block and a
    transition; the step's gradients stay plain's."""
    plain = FCDenseNet(2, 2, 3, **TINY, memory="plain", backward_slices=2).double()
    model = FCDenseNet(2, 2, 3, **TINY, memory=mode, backward_slices=2).double()
    model.load_state_dict(plain.state_dict())
    x = torch.randn(2, 2, *SIZES[2], dtype=torch.float64)  # sliced: equal up to the order of sums
    seen = {}
    for net in (plain, model):
        grads = seen.setdefault(net.memory, {})
        for name in ("classifier", "up.1", "transitions_down.0"):
            module = net.get_submodule(name)
            module.register_full_backward_hook(
                lambda m, grad_in, grad_out, name=name, grads=grads: grads.setdefault(name, []).append(grad_out[0]))
            module.register_forward_hook(lambda m, args, out, name=name, grads=grads: out.register_hook(
                lambda g: grads.setdefault(f"{name} output", []).append(g)) and None)
        torch.manual_seed(3)
        net(x).square().sum().backward()
        grads.update({name: [p.grad] for name, p in net.named_parameters()})
    assert len(seen["plain"]) == len(seen[mode]) > len(plain.state_dict()) // 3
    for name, want in seen["plain"].items():
        got = seen[mode][name]
        assert len(got) == len(want) == 1 and torch.allclose(got[0], want[0], rtol=1e-9, atol=1e-12), name


@pytest.mark.parametrize("mode", ["efficient", "frugal"])
def test_timms_freeze_and_unfreeze_train_as_plain(mode: str) -> None:
    """timm's ``freeze`` puts ``FrozenBatchNorm2d`` in the down path's norms, transitions included, and ``unfreeze``
    puts ``nn.BatchNorm2d`` back, which the model adopts as its own exact norm: a step after each equals plain's, and
    the transitions' running statistics count the one step after unfreezing."""
    from timm.utils import freeze, unfreeze
    plain = FCDenseNet(2, 2, 3, **TINY, drop_rate=0.0, memory="plain")
    model = FCDenseNet(2, 2, 3, **TINY, drop_rate=0.0, memory=mode)
    model.load_state_dict(plain.state_dict())
    x, steps = torch.randn(2, 2, *SIZES[2]), []
    for net in (plain, model):
        outputs = []
        for change in (freeze, unfreeze):
            change(net, ["down", "transitions_down"])
            net.zero_grad()
            out = net(x)
            out.square().sum().backward()
            outputs += [out, *(p.grad for p in net.parameters() if p.grad is not None), *net.buffers()]
        steps.append(outputs)
    assert type(model.transitions_down[0].norm) is effidense.layers.norm.BatchNormAct2d
    assert model.transitions_down[0].norm.num_batches_tracked == 1
    assert len(steps[0]) == len(steps[1])
    for a, b in zip(*steps, strict=True):  # the order of sums aside
        assert torch.allclose(a.float(), b.float(), rtol=1e-4, atol=1e-5 * b.float().abs().max().item())


def test_dropout_is_drawn_so_the_equality_above_covers_its_masks() -> None:
    model = FCDenseNet(2, 2, 3, **TINY, memory="frugal")
    x = torch.randn(2, 2, *SIZES[2])
    torch.manual_seed(1)
    a = model(x)
    torch.manual_seed(2)
    assert not torch.equal(a, model(x))  # dropout is on: a rerun with another mask would change the gradients


def test_a_rerun_uses_the_mask_forward_drew() -> None:
    """Frugal's backward reruns each layer and transition after forward has moved the RNG on: its gradients still
    equal plain's."""
    plain = FCDenseNet(2, 2, 3, **TINY, drop_rate=0.5, memory="plain")
    frugal = FCDenseNet(2, 2, 3, **TINY, drop_rate=0.5, memory="frugal")
    frugal.load_state_dict(plain.state_dict())
    x = torch.randn(2, 2, *SIZES[2])
    for model in (plain, frugal):
        torch.manual_seed(7)
        out = model(x)
        torch.rand(1000)  # the RNG moves on between forward and backward
        out.square().sum().backward()
    for p, q in zip(plain.parameters(), frugal.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_the_reference_port_computes_the_same_function(dims: int) -> None:
    size = {1: (11,), 2: (13, 10), 3: (9, 6, 7)}[dims]
    model = FCDenseNet(dims, 2, 3, **TINY, drop_rate=0.0)
    reference = ReferenceTiramisu(dims, 2, 3, **TINY, drop_rate=0.0)
    reference.load_state_dict(model.state_dict())
    x = torch.randn(2, 2, *size)
    out = model(x)
    assert out.shape == (2, 3, *size)
    torch.testing.assert_close(out, reference(x))


def test_odd_sizes_crop_to_every_skip() -> None:
    model = FCDenseNet(2, 1, 2, **TINY, memory="efficient")
    for size in ((4, 4), (5, 7), (15, 8), (4, 33)):
        out = model(torch.randn(2, 1, *size))
        assert out.shape == (2, 2, *size)
        out.sum().backward()


def test_parameter_counts_match_the_paper() -> None:
    """The paper: 1.5M, 3.5M and 9.4M (counted with BatchNorm's running statistics, 11 classes)."""
    def counted(model: FCDenseNet) -> float:
        running = sum(b.numel() for k, b in model.named_buffers() if "running" in k)
        return (sum(p.numel() for p in model.parameters()) + running) / 1e6

    with torch.device("meta"):
        assert counted(fcdensenet103()) == pytest.approx(9.4, abs=0.05)
        assert counted(fcdensenet67()) == pytest.approx(3.5, abs=0.05)
        assert counted(fcdensenet56()) == pytest.approx(1.4, abs=0.05)  # the paper says 1.5M; see segmentation.md


def test_builders_are_public_and_take_monai_style_arguments() -> None:
    assert effidense.FCDenseNet is FCDenseNet and effidense.fcdensenet103 is fcdensenet103
    with torch.device("meta"):
        model = effidense.fcdensenet56(spatial_dims=3, in_channels=1, out_channels=2, memory="frugal")
    assert model.memory == "frugal" and model.bottleneck.memory == "frugal"
    assert model.classifier.out_channels == 2 and model.stem.in_channels == 1 and model.min_input_size == 32


@pytest.mark.parametrize("dims", [2, 3])
def test_fx_and_export_graphs_compute_what_eager_computes(dims: int) -> None:
    """A graph (``torch.fx``, as FX graph-mode quantisation and feature extractors trace; ``torch.export``, ONNX's
    route) of the plain model on odd sizes, whose up path crops: eager's output in eval mode, and in training its
    output, gradients and running statistics (an fx graph, traced in training, draws dropout as traced)."""
    torch.manual_seed(0)
    models = {"eager": FCDenseNet(dims, 2, 3, **TINY, memory="frugal")}
    models["fx"] = torch.fx.symbolic_trace(models["eager"])
    x = torch.randn(2, 2, *SIZES[dims])
    assert torch.equal(torch.export.export(models["eager"].eval(), (x,)).module()(x), models["eager"](x))
    assert torch.equal(torch.fx.symbolic_trace(models["eager"])(x), models["eager"](x))
    models["eager"].train()
    twin = {"eager": models["eager"], "fx": copy.deepcopy(models["fx"])}
    twin["fx"].load_state_dict(twin["eager"].state_dict())
    outputs = _step_all(twin, dims, steps=2)
    assert all(torch.equal(a, b) for a, b in zip(outputs["eager"], outputs["fx"], strict=True))
    assert all(torch.equal(a, b) for a, b in zip(twin["eager"].buffers(), twin["fx"].buffers(), strict=True))


def test_device_and_dtype_make_the_float32_models_weights_there() -> None:
    """As timm's models take them (and DenseNet): shapes only on "meta", and the float32 model's weights, cast."""
    shapes = fcdensenet56(device="meta", memory="frugal")
    assert all(t.is_meta for t in (*shapes.parameters(), *shapes.buffers())) and shapes.memory == "frugal"
    torch.manual_seed(0)
    reference = FCDenseNet(2, 2, 3, **TINY)
    torch.manual_seed(0)
    model = FCDenseNet(2, 2, 3, **TINY, dtype=torch.float64, device="cpu")
    assert all(p.dtype == torch.float64 for p in model.parameters())
    assert all(torch.equal(a, b.double()) for a, b in zip(model.state_dict().values(),
                                                          reference.state_dict().values(), strict=True)
               if a.is_floating_point())


@pytest.mark.parametrize("layers", [dict(norm_layer=lambda c: GroupNormAct(2, c)),
                                    dict(norm_layer="batchnorm", act_layer="silu")], ids=["group", "timm names"])
def test_another_norm_and_the_bottleneck_layer_stay_exact(layers: dict) -> None:
    kwargs = dict(**TINY, bn_size=2, **layers)
    plain = FCDenseNet(2, 2, 3, **kwargs, memory="plain")
    frugal = FCDenseNet(2, 2, 3, **kwargs, memory="frugal")
    frugal.load_state_dict(plain.state_dict())
    outputs = _step_all({"plain": plain, "frugal": frugal}, 2, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(outputs["plain"], outputs["frugal"], strict=True))


@pytest.mark.parametrize("mode", ["efficient", "frugal"])
def test_convolutions_wrapped_with_adapters_train_as_plain(mode: str) -> None:
    """Every convolution wrapped with a LoRA-like adapter (not a convolution itself), under backward_slices=2: each
    mode still trains bitwise as plain, the wrapped convolutions rerunning as they are."""
    plain = FCDenseNet(2, 2, 3, **TINY, memory="plain")
    other = FCDenseNet(2, 2, 3, **TINY, memory=mode, backward_slices=2)
    other.load_state_dict(plain.state_dict())
    for model in (plain, other):
        torch.manual_seed(0)
        for name, module in list(model.named_modules()):
            if type(module) is torch.nn.Conv2d:
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, Adapted(module))
    outputs = _step_all({"plain": plain, mode: other}, 2, steps=1)
    assert all(torch.equal(a, b) for a, b in zip(outputs["plain"], outputs[mode], strict=True))


@pytest.mark.parametrize("mode", ["efficient", "frugal"])
def test_an_empty_batch_trains_as_in_plain(mode: str) -> None:
    plain = FCDenseNet(3, 2, 3, **TINY, memory="plain")
    other = FCDenseNet(3, 2, 3, **TINY, memory=mode, backward_slices=2)
    other.load_state_dict(plain.state_dict())
    runs = []
    for model in (plain, other):
        x = torch.randn(0, 2, 8, 8, 8, requires_grad=True)
        out = model(x)
        out.sum().backward()
        runs.append([out, x.grad, *(p.grad for p in model.parameters()), *model.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("mode", ["efficient", "frugal"])
def test_a_model_on_the_meta_device_goes_forward_and_backward(mode: str) -> None:
    model = FCDenseNet(2, 2, 3, **TINY, memory=mode, backward_slices=2).to_empty(device="meta")
    x = torch.empty(2, 2, 16, 16, device="meta", requires_grad=True)
    model(x).sum().backward()
    assert x.grad.shape == x.shape and all(p.grad.shape == p.shape for p in model.parameters())


@pytest.mark.parametrize("drop_rate", [0.0, 0.2])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_a_sliced_backward_keeps_forward_bitwise_and_gradients_within_sum_order(dims: int, drop_rate: float) -> None:
    """``backward_slices``, as on DenseNet, reaches every layer and transition down (whose dropout's mask is kept,
    and whose pool goes back a slice at a time): outputs and running statistics stay bitwise plain's, gradients equal
    plain's up to the order of float sums (DenseNet's tolerance, tests/test_slicing.py)."""
    plain = FCDenseNet(dims, 2, 3, **TINY, memory="plain", drop_rate=drop_rate)
    models = {"plain": plain}
    for mode in ("efficient", "frugal"):
        models[mode] = FCDenseNet(dims, 2, 3, **TINY, memory=mode, drop_rate=drop_rate, backward_slices=2)
        models[mode].load_state_dict(plain.state_dict())
        assert {m.backward_slices for m in models[mode].modules() if hasattr(m, "backward_slices")} == {2}
    outputs = _step_all(models, dims, steps=1)
    count = 1 + len(list(plain.parameters()))
    scale = max(float(g.abs().max()) for g in outputs["plain"][1:count])
    for mode in ("efficient", "frugal"):
        assert torch.equal(outputs["plain"][0], outputs[mode][0]), mode
        for a, b in zip(outputs["plain"][1:count], outputs[mode][1:count], strict=True):
            assert float((a - b).abs().max()) <= 1e-5 * scale, mode
        for (key, a), b in zip(plain.state_dict().items(), models[mode].state_dict().values(), strict=True):
            assert "running" not in key or torch.equal(a, b), (mode, key)


def test_a_sliced_transition_down_uses_its_kept_mask_and_reruns_under_double_backward() -> None:
    """A sliced transition down's backward, after forward has moved the RNG on, and a gradient penalty
    (``create_graph=True``, which reruns it whole with the kept mask): the plain model's gradients within float64's
    order of sums."""
    plain = FCDenseNet(2, 2, 3, **TINY, drop_rate=0.5, memory="plain").double()
    sliced = FCDenseNet(2, 2, 3, **TINY, drop_rate=0.5, memory="frugal", backward_slices=None).double()
    sliced.load_state_dict(plain.state_dict())
    for down in sliced.transitions_down:
        down.backward_slices = 3
    x = torch.randn(5, 2, *SIZES[2], dtype=torch.float64)
    penalties = []
    for model in (plain, sliced):
        torch.manual_seed(7)
        out = model(x)
        torch.rand(1000)  # the RNG moves on between forward and backward
        out.square().sum().backward()
        torch.manual_seed(8)
        xi = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(model(xi).square().sum(), xi, create_graph=True)
        grad.square().sum().backward()
        penalties.append(grad)
    torch.testing.assert_close(penalties[1], penalties[0], rtol=1e-9, atol=1e-12)
    scale = max(float(p.grad.abs().max()) for p in plain.parameters())
    for p, q in zip(plain.parameters(), sliced.parameters(), strict=True):
        assert float((p.grad - q.grad).abs().max()) <= 1e-12 * scale


@pytest.mark.parametrize("mode", ["efficient", "frugal"])
def test_weights_given_through_functional_call_are_the_ones_differentiated(mode: str) -> None:
    """Weights given for one call (``torch.func.functional_call``) are gone from the modules by backward: sliced
    transitions down go back through the convolution by the weight forward used. Plain's gradients with respect to
    the given weights and the model's own, within float64's order of sums."""
    from torch.func import functional_call
    x, runs = torch.randn(4, 2, *SIZES[2], dtype=torch.float64), []
    for memory in ("plain", mode):
        torch.manual_seed(0)
        model = FCDenseNet(2, 2, 3, **TINY, memory=memory, backward_slices=2).double()
        params = dict(model.named_parameters())
        weights = {name: (1.1 * p + 0.01).detach().requires_grad_() for name, p in params.items()}
        torch.manual_seed(3)
        loss = functional_call(model, weights, (x,)).square().mean()
        runs.append([loss.detach(), *torch.autograd.grad(loss, list(weights.values()))])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mode", ["efficient", "frugal"])
def test_backward_after_model_eval_is_plains(mode: str) -> None:
    """A training forward, then ``model.eval()`` before backward: sliced transitions down keep their dropout and the
    checkpoints rerun in forward's mode. The plain model's gradients, within float64's order of sums."""
    x, runs = torch.randn(4, 2, *SIZES[2], dtype=torch.float64), []
    for memory in ("plain", mode):
        torch.manual_seed(0)
        model = FCDenseNet(2, 2, 3, **TINY, memory=memory, backward_slices=2).double()
        torch.manual_seed(3)
        loss = model(x).square().mean()
        model.eval()
        loss.backward()
        runs.append([loss.detach(), *(p.grad for p in model.parameters())])
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_a_sliced_transition_down_saves_its_mask_where_saved_tensor_hooks_see_it() -> None:
    """The mask a sliced transition down keeps (one bit a value, each sample in bytes of its own) goes through
    autograd's saved-tensor hooks, as the maps do, so the meter counts it and offloading hooks move it; bf16 autocast
    and channels_last stay bitwise plain's forward."""
    plain = FCDenseNet(2, 2, 3, **TINY, memory="plain").to(memory_format=torch.channels_last)
    sliced = FCDenseNet(2, 2, 3, **TINY, memory="frugal", backward_slices=None).to(memory_format=torch.channels_last)
    sliced.load_state_dict(plain.state_dict())
    sliced.transitions_down[0].backward_slices = 2
    x = torch.randn(4, 2, 16, 16).to(memory_format=torch.channels_last)
    packed = []
    outs = []
    for model in (plain, sliced):
        torch.manual_seed(3)

        def pack(t: torch.Tensor, model: FCDenseNet = model) -> torch.Tensor:
            packed.append((model, t.dtype, t.shape))
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t), \
                torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().sum().backward()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    channels = TINY["init_features"] + 2 * TINY["growth_rate"]  # the first transition down's: 16 at 16x16
    assert (sliced, torch.uint8, (4, channels * 16 * 16 // 8)) in packed


def test_a_sliced_transition_down_lowers_the_allocators_peak() -> None:
    """Where the first transition down sets the step's peak (a wide first block), slicing it lowers the peak by the
    CPU allocator: its rerun no longer holds the batch's normalised map, convolution output, pool input and their
    gradients at once."""
    from effidense.memory import cpu_peak_bytes
    model = FCDenseNet(2, 3, 2, down_blocks=(4, 1), up_blocks=(1, 1), bottleneck_layers=1, growth_rate=16,
                       init_features=32, memory="frugal", backward_slices=4)
    x = torch.randn(8, 3, 64, 64)
    peaks = {}
    for slices in (None, 4):
        model.transitions_down[0].backward_slices = slices
        model(x).sum().backward()  # gradients exist, as in training after the first step
        peaks[slices] = cpu_peak_bytes(lambda: model(x).sum().backward())
    assert peaks[4] < 0.85 * peaks[None]


@pytest.mark.parametrize("build, message", [
    (lambda: FCDenseNet(4, 1, 2), "spatial_dims must be 1, 2 or 3, got 4"),
    (lambda: FCDenseNet(2, 0, 2), "in_channels must be a positive integer, got 0"),
    (lambda: FCDenseNet(2, 1, 2, down_blocks=(2, 2), up_blocks=(2,)),
     "up_blocks must have as many blocks as down_blocks (2), got 1"),
    (lambda: FCDenseNet(2, 1, 2, bn_size=0), "bn_size must be a positive integer, got 0"),
    (lambda: FCDenseNet(2, 1, 2, drop_rate=1.0), "drop_rate must be a number in [0, 1), got 1.0"),
    (lambda: FCDenseNet(2, 1, 2, memory="lean"), "memory must be one of 'plain', 'efficient', 'frugal'"),
    (lambda: FCDenseNet(2, 1, 2, backward_slices=0), "backward_slices must be 'auto', None (not sliced) or a"),
    (lambda: FCDenseNet(2, 1, 2, act_layer="no_such_act"), "act_layer='no_such_act' is not a timm activation name"),
])
def test_bad_settings_get_one_line(build, message: str) -> None:
    with torch.device("meta"), pytest.raises((ValueError, TypeError)) as info:
        build()
    assert message in str(info.value) and "\n" not in str(info.value)


def test_bad_inputs_get_one_line() -> None:
    model = FCDenseNet(2, 2, 3, **TINY)
    with pytest.raises(ValueError, match=r"^input of 3x9 does not survive the down path: its 2 max-pools need at "
                                         r"least 4 positions along every axis$"):
        model(torch.randn(2, 2, 3, 9))
    with pytest.raises(ValueError, match=r"^expected an input of shape \(N, 2, H, W\), got \(2, 3, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8))
    with pytest.raises(ValueError, match=r"expected an input of shape \(N, 2, H, W\), got \(2, 2, 8, 8, 8\)"):
        model(torch.randn(2, 2, 8, 8, 8))
