"""A backward that goes through the batch in slices (``backward_slices``): forward stays bitwise the plain model's
(outputs and running statistics), gradients equal the plain model's up to the order of floating-point sums, and the
step's peak, by the CPU allocator, falls."""
from __future__ import annotations

import copy
import gc
import os

import pytest
import torch
from conftest import TINY, fused_then_apart, one_line_error

import effidense.layers.light as light
from effidense import DenseBlock, DenseNet, Transition
from effidense.memory import StorageTracker, cpu_peak_bytes

# Gradients differ from the plain model's only by the order of floating-point sums: |a - b| <= TOL * the largest
# gradient of the model (a single gradient can be a cancellation of terms far larger than itself).
TOL = {torch.float32: 1e-5, torch.float64: 1e-12}
SIZES = {1: 48, 2: 24, 3: 14}


@pytest.fixture(autouse=True)
def maps_apart_in_backward(monkeypatch):
    """The tiny models here read their maps apart in a sliced backward, as a large batch's slices do."""
    monkeypatch.setattr(light, "APART_FLOOR", 0)


def _close(sliced: torch.nn.Module, plain: torch.nn.Module, dtype: torch.dtype) -> None:
    scale = max(float(p.grad.abs().max()) for p in plain.parameters())
    for (name, a), b in zip(sliced.named_parameters(), plain.parameters(), strict=True):
        assert float((a.grad - b.grad).abs().max()) <= TOL[dtype] * scale, name


def _pair(model: torch.nn.Module, mode: str, slices: object) -> tuple[torch.nn.Module, torch.nn.Module]:
    plain = copy.deepcopy(model)
    plain.memory = "plain"
    sliced = copy.deepcopy(model)
    sliced.memory, sliced.backward_slices = mode, slices
    return sliced, plain


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", ["efficient", "frugal"])
def test_model_forward_bitwise_and_gradients_within_sum_order(mode, dims, dtype):
    """Three SGD steps, slices of 2, 2 and 1 samples: outputs and running statistics bitwise, gradients (and so
    weights) within the tolerance of the order of sums."""
    sliced, plain = _pair(DenseNet(**TINY, spatial_dims=dims, drop_rate=0.2).to(dtype), mode, 3)
    x = torch.randn(5, 3, *[SIZES[dims]] * dims, dtype=dtype)
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (sliced, plain)]
    for step in range(3):
        outs = []
        for model, optimizer in zip((sliced, plain), optimizers, strict=True):
            torch.manual_seed(step)  # the same dropout draws
            optimizer.zero_grad()
            out = model(x)
            out.square().mean().backward()
            outs.append(out)
        if step == 0:
            assert torch.equal(outs[0], outs[1])
            for a, b in zip(sliced.buffers(), plain.buffers(), strict=True):
                assert torch.equal(a, b)
        else:
            torch.testing.assert_close(outs[0], outs[1], rtol=1e3 * TOL[dtype], atol=1e3 * TOL[dtype])
        _close(sliced, plain, dtype)
        for optimizer in optimizers:
            optimizer.step()


@pytest.mark.parametrize("dims", [1, 2, 3])
@pytest.mark.parametrize("mode", ["efficient", "frugal"])
def test_dense_block_input_gradient(mode, dims):
    """A DenseBlock alone, with the gradient of its input too (the concatenation's backward, slice by slice)."""
    sliced, plain = _pair(DenseBlock(3, 6, 4, spatial_dims=dims).double(), mode, 2)
    x = torch.randn(3, 6, *[6] * dims, dtype=torch.float64)
    grads = []
    for block in (sliced, plain):
        xi = x.clone().requires_grad_()
        out = block(xi)
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out).sin()).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12 * float(grads[1].abs().max()))
    _close(sliced, plain, torch.float64)


def test_eval_mode_and_double_backward():
    """Eval mode (running statistics: nothing couples the samples) and a gradient penalty (create_graph=True)
    give the plain model's results."""
    sliced, plain = _pair(DenseNet(**TINY).double(), "frugal", 2)
    x = torch.randn(4, 3, 24, 24, dtype=torch.float64)
    for model in (sliced, plain):
        model.eval()
        model(x).sum().backward()
    _close(sliced, plain, torch.float64)
    penalties = []
    for model in (sliced, plain):
        model.train().zero_grad()
        xi = x.clone().requires_grad_()
        (grad,) = torch.autograd.grad(model(xi).square().sum(), xi, create_graph=True)
        grad.square().sum().backward()
        penalties.append(grad)
    torch.testing.assert_close(penalties[0], penalties[1], rtol=1e-9, atol=1e-12)
    _close(sliced, plain, torch.float64)


@pytest.mark.parametrize("dims", [2, 3])
def test_autocast_and_channels_last_stay_close(dims):
    """bf16 autocast, channels_last; in 3D CPU autocast pools in float32 between bfloat16 convolutions. (24³, not
    14³: oneDNN's bf16 conv3d backward on 2³ maps, as block 2 would get, now and then gives the plain model garbage
    weight gradients, torch 2.14 on this CPU.)"""
    layout = torch.channels_last if dims == 2 else torch.channels_last_3d
    sliced, plain = _pair(DenseNet(**TINY, spatial_dims=dims).to(memory_format=layout), "frugal", 3)
    x = torch.randn(4, 3, *[SIZES[dims] if dims == 2 else 24] * dims).to(memory_format=layout)
    outs = []
    for model in (sliced, plain):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        out.float().square().mean().backward()
        outs.append(out)
    assert torch.equal(outs[0], outs[1])
    scale = max(float(p.grad.abs().max()) for p in plain.parameters())
    for a, b in zip(sliced.parameters(), plain.parameters(), strict=True):
        assert float((a.grad - b.grad).abs().max()) <= 2e-2 * scale  # bfloat16's own rounding


def test_slices_off_below_the_floor_or_one_sample_are_bitwise():
    """'auto' leaves reruns under the floor whole, and so does a batch of one sample: bitwise the plain model's."""
    for slices, batch in (("auto", 4), (None, 4), (3, 1)):
        sliced, plain = _pair(DenseNet(**TINY), "frugal", slices)
        x = torch.randn(batch, 3, 24, 24)
        for model in (sliced, plain):
            model(x).square().mean().backward()
        for a, b in zip(sliced.parameters(), plain.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad)


def test_auto_slice_counts():
    """'auto' slices a rerun that would hold more than the floor and more than the mode keeps beside it (or, given
    no keep, frugal's), so that a slice holds half of what the rerun reads; a count above the batch takes the batch."""
    big = 2 * light.SLICE_FLOOR
    assert light.slice_count("auto", True, 64, big, big / 3) == 6
    assert light.slice_count("auto", True, 4, big, big / 3) == 4
    assert light.slice_count("auto", True, 64, light.SLICE_FLOOR, 1) == 1
    assert light.slice_count("auto", False, 64, big, big / 3) == 1
    assert light.slice_count("auto", False, 64, big, big / 3, keeps=big / 2) == 6
    assert light.slice_count("auto", True, 64, big, big / 3, keeps=big) == 1
    assert light.slice_count("auto", False, 64, light.SLICE_FLOOR, 1, keeps=0) == 1
    assert light.slice_count(5, False, 64, 0, 0) == 5
    assert light.slice_count(100, False, 3, 0, 0) == 3
    assert light.slice_count(None, True, 64, big, 1) == 1


def _slices_run(model: torch.nn.Module, x: torch.Tensor, monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The slices each dense layer's light segment was given in one training forward of ``model``."""
    seen, apply = [], light.LightSegment.apply
    monkeypatch.setattr(light, "SLICE_FLOOR", 0)  # every rerun is large enough to slice

    def spy(slices, *args):
        seen.append(slices)
        return apply(slices, *args)

    monkeypatch.setattr(light.LightSegment, "apply", spy)
    model(x)
    monkeypatch.undo()
    return seen


def test_auto_slices_where_a_layer_would_hold_more_than_its_block_keeps(monkeypatch):
    """'auto', past the floor: frugal slices every dense layer; efficient slices none of DenseNet-BC's (each layer's
    bottleneck is kept, which outweighs a rerun) and every one without a bottleneck (FC-DenseNet's, whose reruns
    hold three times what they read, more than their block keeps)."""
    from effidense import FCDenseNet
    bc = dict(growth_rate=8, block_config=(3, 3), num_init_features=16, num_classes=3, small_inputs=True)
    x = torch.randn(2, 3, 16, 16)
    assert set(_slices_run(DenseNet(**bc, memory="frugal"), x, monkeypatch)) == {2}
    assert set(_slices_run(DenseNet(**bc, memory="efficient"), x, monkeypatch)) == {1}
    fc = dict(down_blocks=(2, 2), up_blocks=(2, 2), bottleneck_layers=2, growth_rate=4, init_features=8)
    efficient = _slices_run(FCDenseNet(2, 3, 2, **fc), x, monkeypatch)
    assert efficient.count(2) == 10 and set(efficient) == {2}
    bc_no_bottleneck = _slices_run(DenseNet(**{**bc, "bn_size": None}, memory="efficient"), x, monkeypatch)
    assert bc_no_bottleneck.count(2) == 6


def test_hooked_norm_is_not_sliced():
    """A norm with hooks is called, so its hooks fire: its layer then reruns whole, bitwise."""
    sliced, plain = _pair(DenseNet(**TINY), "frugal", None)
    sliced.features.denseblock1.denselayer1.backward_slices = 3
    seen = []
    sliced.features.denseblock1.denselayer1.norm1.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    x = torch.randn(4, 3, 24, 24)
    for model in (sliced, plain):
        model(x).sum().backward()
    assert seen
    for a, b in zip(sliced.parameters(), plain.parameters(), strict=True):
        assert torch.equal(a.grad, b.grad)


@pytest.mark.parametrize("bad", [0, -2, 1.5, True, "half"])
def test_bad_slice_settings_get_one_line(bad):
    model = DenseNet(**TINY)
    with pytest.raises(ValueError) as err:
        model.backward_slices = bad
    assert one_line_error(str(err.value)).startswith("backward_slices must be 'auto', None")
    with pytest.raises(ValueError, match="backward_slices"):
        DenseNet(**TINY, backward_slices=bad)


def test_sliced_backward_lowers_the_allocators_peak():
    """The allocator's peak of a frugal step falls with slices: a rerun holds a slice's maps, not the batch's."""
    model = DenseNet(growth_rate=8, block_config=(4, 2), num_init_features=16, num_classes=5, memory="frugal")
    x = torch.randn(8, 3, 64, 64)
    peaks = {}
    for slices in (None, 8):
        model.backward_slices = slices
        model(x).sum().backward()  # gradients exist, as in training after the first step
        peaks[slices] = cpu_peak_bytes(lambda: model(x).sum().backward())
    assert peaks[8] < 0.8 * peaks[None]


def test_frugal_densenet121_first_transition_forward_holds_less_than_its_whole_batch():
    """Frugal's first transition reads DenseNet-121's largest concatenation, and its forward (bitwise the plain
    model's, so not sliced) holds the norm's and the convolution's outputs for the whole batch. Run with the block's
    last layer as one checkpoint, it empties that layer's features once normalised, and its sliced backward stays
    below: the step's peak is under the input, block 1's maps, the norm's output and the convolution's, which the
    transition's forward held at once before. Fake tensors, bf16 autocast, a batch where activations dwarf weights;
    DenseNet-121's stem, first block and transition, with one layer after them (the rest only adds host time)."""
    from effidense.harness import StepProbe, StepSpec
    probe = StepProbe(lambda: DenseNet(block_config=(6, 1), memory="frugal", num_classes=10),
                      StepSpec(num_classes=10, amp=torch.bfloat16))
    batch, bf16 = 2048, 2
    whole_forward = batch * (3 * 224 * 224 * 4 + (256 + 256 + 128) * 56 * 56 * bf16)
    assert probe.measure(batch, (224, 224)).peak_bytes < whole_forward


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_frugal_transition_empties_its_blocks_last_map(dims, monkeypatch):
    """A frugal block's last layer and the sliced transition after it run as one checkpoint: the transition's forward
    empties the layer's new features once normalised, and the checkpoint's rerun rebuilds them (counting no batch in
    the running statistics). Outputs, running statistics and gradients (double backward included) are bitwise those of
    the two run apart (which are the plain model's within the order of sums: the tests above), and the forward's peak
    (counted by tensors: on this scale the CPU's convolution scratch sets the allocator's) falls by that map."""
    model = DenseNet(growth_rate=16, block_config=(4, 1), num_init_features=8, bn_size=None, num_classes=5,
                     drop_rate=0.2, small_inputs=True, memory="frugal", backward_slices=2, spatial_dims=dims).double()
    positions = {1: [1024], 2: [32, 32], 3: [10, 10, 10]}[dims]
    x = torch.randn(4, 3, *positions, dtype=torch.float64)
    runs = []
    for fused in (True, False):
        if not fused:
            monkeypatch.setattr(Transition, "frees_after", lambda *args: False)
        copy_ = copy.deepcopy(model)
        with StorageTracker() as tracker:
            copy_(x)
        peak = tracker.peak
        copy_ = copy.deepcopy(model)
        torch.manual_seed(0)
        out = copy_(x)
        out.square().sum().backward()
        xi = x.clone().requires_grad_()
        torch.manual_seed(1)
        (grad,) = torch.autograd.grad(copy_(xi).square().sum(), xi, create_graph=True)
        grad.square().sum().backward()  # on top of the first step's gradients
        runs.append((out, grad, copy_.state_dict(), [p.grad for p in copy_.parameters()], peak))
    (out, grad, state, grads, peak), (out_apart, grad_apart, state_apart, grads_apart, peak_apart) = runs
    assert torch.equal(out, out_apart) and torch.equal(grad, grad_apart)
    assert all(torch.equal(state[k], state_apart[k]) for k in state)
    assert all(torch.equal(a, b) for a, b in zip(grads, grads_apart, strict=True))
    if dims < 3:  # in 3D float64 convolutions' column buffers set the peak
        assert peak == peak_apart - 4 * 16 * x[0, 0].numel() * 8  # the last layer's features


@pytest.mark.parametrize("input_grad", [False, True])
def test_frugal_last_layer_with_its_transition_under_a_frozen_block(input_grad, monkeypatch):
    """Transfer learning freezes the early layers: with the stem and the first block frozen (and an input that needs
    no gradient), the layer's maps need none, the transition's weights do. The checkpoint's rerun saves what the
    transition saved all the same, and the step is bitwise the one with the two run apart."""
    fused: list[bool] = []
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, requires_grad=input_grad)
    runs = []
    for _ in fused_then_apart(monkeypatch, fused):
        model = _fused_model()
        for name, p in model.named_parameters():
            p.requires_grad_(not name.startswith(("features.conv0", "features.denseblock1")))
        model(x).square().sum().backward()
        runs.append([p.grad for p in model.parameters()] + [x.grad])
        x.grad = None
    assert fused == [True]
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(*runs, strict=True))


def test_frugal_last_layer_with_its_transition_under_weights_given_by_functional_call(monkeypatch):
    """Weights given for one call (``torch.func.functional_call``) are gone from the modules by backward: the fused
    checkpoint's rerun, which does not call the transition, still saves the weights its forward used. Gradients with
    respect to the given weights are those of the two run apart, bitwise."""
    from torch.func import functional_call
    fused: list[bool] = []
    x, runs = torch.randn(4, 3, 32, 32, dtype=torch.float64), []
    for _ in fused_then_apart(monkeypatch, fused):
        model = _fused_model()
        weights = {name: (1.1 * p + 0.01).detach().requires_grad_() for name, p in model.named_parameters()}
        loss = functional_call(model, weights, (x,)).square().sum()
        runs.append([loss.detach(), *torch.autograd.grad(loss, list(weights.values()))])
    assert fused == [True]
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("switched", ["plain", "efficient"])
def test_a_memory_mode_set_between_forward_and_backward_changes_nothing_in_backward(switched):
    """``set_memory`` between forward and backward: the fused checkpoint's rerun runs its layer in forward's mode
    (frugal), and the step is bitwise the one left alone (a rerun in another mode saved other tensors and failed)."""
    x, runs = torch.randn(4, 3, 32, 32, dtype=torch.float64), []
    for switch in (False, True):
        model = _fused_model()
        loss = model(x).square().sum()
        if switch:
            model.set_memory(switched)
        loss.backward()
        runs.append([loss.detach(), *(p.grad for p in model.parameters())])
        assert model.memory == (switched if switch else "frugal")
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("parametrization", ["weight_norm", "spectral_norm"])
def test_frugal_parametrised_weights_train_as_plain_at_a_fused_size(parametrization):
    """Where a block's last layer would run with its transition as one checkpoint, parametrised weights there
    (``torch.nn.utils.parametrizations``) keep the two apart, whose segments read each weight once a step: the
    checkpoint's rerun would make them again (a second power iteration of spectral norm, more saved tensors than the
    first run). Two SGD steps equal plain's."""
    from torch.nn.utils import parametrizations
    runs = []
    for memory in ("plain", "frugal"):
        model = _fused_model()
        model.memory = memory
        torch.manual_seed(5)  # spectral norm draws its vectors
        for name in ("features.denseblock1.denselayer4.conv1", "features.transition1.conv"):
            getattr(parametrizations, parametrization)(model.get_submodule(name))
        runs.append(_two_sgd_steps(model))
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(*runs, strict=True))


class _SubclassedBatchNorm(torch.nn.BatchNorm2d):
    pass


def test_frugal_last_layer_that_does_not_run_light_stays_apart_from_its_transition(monkeypatch):
    """A block's last layer whose norm is not effidense's (a BatchNorm subclass put in its place) reruns in a
    checkpoint of its own, which inside the fused checkpoint's rerun would run as a first run and update running
    statistics again (the layer's own and those of the norm put in place): the two stay apart. Two SGD steps equal
    plain's, running statistics included."""
    fused, frees_after = [], Transition.frees_after
    monkeypatch.setattr(Transition, "frees_after", lambda *args: fused.append(frees_after(*args)) or fused[-1])
    runs = []
    for memory in ("plain", "frugal"):
        model = _fused_model()
        model.memory = memory
        name = "features.denseblock1.denselayer4.norm1"
        norm = _SubclassedBatchNorm(model.get_submodule(name).num_features).double()
        norm.load_state_dict(model.get_submodule(name).state_dict())
        model.features.denseblock1.denselayer4.norm1 = norm
        runs.append(_two_sgd_steps(model))
    assert fused == [False, False]
    assert all(torch.allclose(a, b, rtol=1e-9, atol=1e-12) for a, b in zip(*runs, strict=True))


def _two_sgd_steps(model: DenseNet) -> list[torch.Tensor]:
    """Two SGD steps on the same batch; the last outputs, then every parameter and buffer."""
    opt = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.randn(4, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for _ in range(2):
        opt.zero_grad()
        out = model(x)
        out.square().mean().backward()
        opt.step()
    return [out.detach(), *(t.detach() for t in (*model.parameters(), *model.buffers()))]


def _fused_model() -> DenseNet:
    torch.manual_seed(0)
    return DenseNet(growth_rate=16, block_config=(4, 1), num_init_features=8, bn_size=None, num_classes=5,
                    small_inputs=True, memory="frugal", backward_slices=2).double()


def _ddp_rank(rank: int, init_method: str, out_dir: str) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    torch.set_num_threads(1)  # as the test's own process: the same kernels, summing in the same order
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=2)
    fused, frees_after = [], Transition.frees_after
    Transition.frees_after = lambda *args: fused.append(frees_after(*args)) or fused[-1]
    model = DistributedDataParallel(_fused_model())
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    for _ in range(2):  # the second step reads the buffers DDP broadcast
        model.zero_grad()
        model(x[4 * rank:4 * rank + 4]).square().sum().backward()
    torch.save((fused, [p.grad for p in model.parameters()]), os.path.join(out_dir, f"rank{rank}.pt"))
    del model
    gc.collect()
    dist.destroy_process_group()


@pytest.mark.slow
def test_frugal_last_layer_with_its_transition_under_ddp(tmp_path, monkeypatch):
    """Under DDP (2 ranks, gloo) the checkpoint that runs a block's last layer with its transition reruns in backward
    as alone: the averaged gradients are bitwise those of each rank's half run apart, in one process."""
    import torch.multiprocessing as mp

    from effidense.harness import free_port
    mp.spawn(_ddp_rank, args=(f"tcp://127.0.0.1:{free_port()}", str(tmp_path)), nprocs=2, join=True)
    monkeypatch.setattr(Transition, "frees_after", lambda *args: False)
    x = torch.randn(8, 3, 32, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    halves = []
    for rank in range(2):
        model = _fused_model()
        for _ in range(2):
            model.zero_grad()
            model(x[4 * rank:4 * rank + 4]).square().sum().backward()
        halves.append([p.grad for p in model.parameters()])
    for rank in range(2):
        fused, grads = torch.load(tmp_path / f"rank{rank}.pt")
        assert fused == [True, True]
        assert all(torch.equal(g, (a + b) / 2) for g, a, b in zip(grads, *halves, strict=True))


def test_frugal_keeps_the_last_map_where_the_gradients_outweigh_it(monkeypatch):
    """The checkpoint's rerun of a block's last layer holds the model's gradients, which the transition's forward did
    not: where they outweigh the layer's features (a small batch), the layer runs apart from its transition."""
    runs, run = [], DenseNet._last_layer_then
    monkeypatch.setattr(DenseNet, "_last_layer_then", staticmethod(lambda *args: runs.append(1) or run(*args)))
    for classes in (5, 4000):  # a classifier of 4000 x 52 weights outweighs 4 x 16 x 32 x 32 features
        model = DenseNet(growth_rate=16, block_config=(4, 1), num_init_features=8, bn_size=None,
                         num_classes=classes, small_inputs=True, memory="frugal", backward_slices=2)
        model(torch.randn(4, 3, 32, 32))
        assert len(runs) == 1  # the first model's block runs with its transition; the second's apart


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "cropped"])
def test_sliced_forward_normalises_each_map_into_one_output(layout, monkeypatch):
    """A sliced segment's forward runs BatchNorm's kernel on each map's channels, writing into one output: bitwise
    the output and running statistics of the kernel run on the concatenation, and the concatenation is never held
    beside the output, so a frugal block's forward peaks lower by about half a concatenation. A cropped map (as
    FC-DenseNet's up path makes) is laid out as in the concatenation first; maps laid out apart, or of one position
    (dense in either layout), are concatenated."""
    block = DenseBlock(3, 64, 32, bn_size=2, memory="frugal", backward_slices=2)  # reads 64, 96, 128 channels
    x = torch.randn(4, 64, 33, 33)[..., :32, :32] if layout == "cropped" else torch.randn(4, 64, 32, 32)
    x = (x.to(memory_format=torch.channels_last) if layout == "channels_last" else x).requires_grad_()
    runs = {}
    for apart in (True, False):
        if not apart:
            monkeypatch.setattr(light, "_layout", lambda t: None)
        copy_ = copy.deepcopy(block)
        maps = copy_.run([x])
        peak = cpu_peak_bytes(lambda copy_=copy_: copy_.run([x]))
        runs[apart] = maps, copy_.state_dict(), peak
    (maps, state, peak), (whole_maps, whole_state, whole_peak) = runs[True], runs[False]
    assert all(torch.equal(a, b) and a.stride() == b.stride() for a, b in zip(maps, whole_maps, strict=True))
    assert all(torch.equal(state[k], whole_state[k]) for k in state)
    assert peak < whole_peak - 0.4 * 4 * 128 * 32 * 32 * 4  # the last layer's concatenation: 2 MiB
    monkeypatch.undo()
    assert light._layout(torch.randn(2, 3, 1, 1)) is None and light._layout(torch.randn(2, 1, 4, 4)) is None
    assert light._layout(torch.randn(2, 3, 4, 4).transpose(2, 3)) is None


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "batch_inner"])
def test_sliced_block_in_any_layout(layout):
    """A sliced frugal block's gradients, the input's among them, stay within the order of sums in any layout: an
    input whose samples are not each one run in memory too."""
    sliced, plain = _pair(DenseBlock(3, 20, 4).double(), "frugal", 3)  # reads 20, 24, 28 channels; bottleneck 16
    x = torch.randn(5, 20, 6, 7, dtype=torch.float64)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "batch_inner":
        x = x.transpose(0, 1).contiguous().transpose(0, 1)
    grads = []
    for block in (sliced, plain):
        xi = x.clone(memory_format=torch.preserve_format).requires_grad_()
        out = block(xi)
        (out * torch.arange(out.numel(), dtype=out.dtype).view_as(out).cos()).sum().backward()
        grads.append(xi.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=0, atol=1e-12 * float(grads[1].abs().max()))
    _close(sliced, plain, torch.float64)


FC_TINY = dict(down_blocks=(2, 2), up_blocks=(2, 2), bottleneck_layers=2, growth_rate=4, init_features=8)


def test_frugal_gathers_each_maps_gradient_in_one_place(monkeypatch):
    """Sliced frugal layers, and FC-DenseNet's classifier, add their gradients for the maps they read to the sums
    for those maps (``GradSlot``) rather than handing autograd a second set to add once they return: a frugal
    FC-DenseNet step peaks lower than an efficient one, which keeps the same maps and slices the same reruns."""
    from effidense import FCDenseNet
    from effidense.harness.footprint import StepProbe, StepSpec
    monkeypatch.setattr(light, "SLICE_FLOOR", 0)  # every rerun is large enough to slice
    config = dict(down_blocks=(3, 3), up_blocks=(3, 3), bottleneck_layers=2, growth_rate=8, init_features=8)
    peaks = {}
    for mode in ("efficient", "frugal"):
        probe = StepProbe(lambda mode=mode: FCDenseNet(2, 3, 4, **config, memory=mode), StepSpec(num_classes=4))
        peaks[mode] = probe.measure(8, (32, 32)).peak_bytes
    assert peaks["frugal"] < 0.85 * peaks["efficient"]


def test_gathered_gradients_belong_to_their_backward():
    """A backward that stops part-way (the classifier's weight only) leaves sums in the slots; the next backward
    starts afresh, and a retained graph gives the same gradients twice, those of a model that never stopped."""
    from effidense import FCDenseNet
    torch.manual_seed(0)
    models = [FCDenseNet(2, 2, 3, **FC_TINY, memory="frugal", backward_slices=2) for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    x, y = torch.randn(4, 2, 12, 12), torch.randint(0, 3, (4, 12, 12))
    grads = []
    for i, model in enumerate(models):
        torch.manual_seed(1)
        loss = torch.nn.functional.cross_entropy(model(x), y)
        if i == 0:
            torch.autograd.grad(loss, [model.classifier.weight], retain_graph=True)
        for _ in range(2 - i):
            model.zero_grad()
            loss.backward(retain_graph=True)
            grads.append([p.grad.clone() for p in model.parameters()])
    assert all(torch.equal(a, b) and torch.equal(a, c) for a, b, c in zip(*grads, strict=True))
