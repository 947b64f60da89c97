"""Every memory mode computes the plain model's function: outputs, gradients and BatchNorm buffers."""
import copy
import functools

import pytest
import timm
import torch
import torch.nn.functional as F
import torch.nn.utils.prune
import torchvision
from conftest import TINY, Adapted
from torch.utils._python_dispatch import TorchDispatchMode

import effidense.layers.norm as norm_module
import effidense.layers.pool as pool
import effidense.layers.recompute as recompute_module
from effidense import DenseNet, SavedTensorMeter
from effidense.densenet import DenseLayer

CONFIGS = {
    "bc_imagenet_stem": dict(TINY),
    "bc_small_inputs": dict(TINY, small_inputs=True, block_config=(2, 2, 2)),
    "plain_densenet": dict(TINY, bn_size=None, compression=1.0, small_inputs=True),
}
MODES = ("efficient", "frugal")


def _perturb_bn(model: torch.nn.Module) -> torch.nn.Module:
    """Non-default running statistics, so an extra update or a mix-up of buffers shows."""
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-1, 1)
            m.running_var.uniform_(0.5, 2)
            m.num_batches_tracked.fill_(7)
    return model


def _steps(model: torch.nn.Module, x: torch.Tensor, steps: int = 2) -> torch.Tensor:
    """``steps`` SGD steps of ``model`` from the same RNG state; returns the last outputs."""
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    torch.manual_seed(1)
    for _ in range(steps):
        opt.zero_grad()
        out = model(x)
        out.square().mean().backward()
        opt.step()
    return out


def _train(model: DenseNet, x: torch.Tensor, mode: str, steps: int = 2):
    """``steps`` SGD steps in ``mode`` from the same RNG state; returns the model and the last outputs."""
    model = copy.deepcopy(model).set_memory(mode).train()
    return model, _steps(model, x, steps)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def _assert_same_state(model: DenseNet, reference: DenseNet, tol: float = 1e-6) -> None:
    """Parameters, their gradients and every buffer; num_batches_tracked exactly."""
    for (name, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
        assert _relative(p, q) <= tol, name
        if q.grad is not None:
            assert _relative(p.grad, q.grad) <= tol, f"grad of {name}"
    for (name, b), c in zip(model.named_buffers(), reference.buffers(), strict=True):
        if name.endswith("num_batches_tracked"):
            assert torch.equal(b, c), f"{name}: {b.item()} != {c.item()}"
        else:
            assert _relative(b, c) <= tol, name


@pytest.mark.parametrize("config", CONFIGS)
@pytest.mark.parametrize("mode", MODES)
def test_training_steps_match_plain(config, mode):
    base = _perturb_bn(DenseNet(**CONFIGS[config], drop_rate=0.2))
    x = torch.randn(4, 3, 16, 16)
    plain, plain_out = _train(base, x, "plain")
    model, out = _train(base, x, mode)
    assert _relative(out, plain_out) <= 1e-6
    _assert_same_state(model, plain)
    for name, b in model.named_buffers():
        if name.endswith("num_batches_tracked"):
            assert b.item() == 7 + 2, name  # two steps, one update each


@pytest.mark.parametrize("mode", MODES)
def test_cumulative_moving_average_bn_matches_plain(mode):
    base = DenseNet(**TINY)
    for m in base.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.momentum = None  # running stats are the average over num_batches_tracked batches
    x = torch.randn(4, 3, 16, 16)
    plain, _ = _train(base, x, "plain", steps=3)
    model, _ = _train(base, x, mode, steps=3)
    _assert_same_state(model, plain)


@pytest.mark.parametrize("mode", MODES)
def test_eval_mode_with_grad_and_frozen_parameters(mode):
    """Feature attribution: eval-mode BN, gradients only for the input."""
    base = _perturb_bn(DenseNet(**TINY)).eval().requires_grad_(False)
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    (g_plain,) = torch.autograd.grad(base.set_memory("plain")(x).sum(), x)
    (g_mode,) = torch.autograd.grad(base.set_memory(mode)(x).sum(), x)
    assert _relative(g_mode, g_plain) <= 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_autograd_grad_and_input_gradients(mode):
    base = DenseNet(**TINY, small_inputs=True)
    x = torch.randn(2, 3, 8, 8, requires_grad=True)
    grads = {}
    for m in ("plain", mode):
        model = copy.deepcopy(base).set_memory(m)
        params = list(model.parameters())
        grads[m] = torch.autograd.grad(model(x).square().sum(), [x, *params])
    for a, b in zip(grads[mode], grads["plain"], strict=True):
        assert _relative(a, b) <= 1e-6


@pytest.mark.parametrize("mode", MODES)
def test_channels_last(mode):
    base = _perturb_bn(DenseNet(**TINY)).to(memory_format=torch.channels_last)
    x = torch.randn(4, 3, 16, 16).to(memory_format=torch.channels_last)
    plain, plain_out = _train(base, x, "plain")
    model, out = _train(base, x, mode)
    assert _relative(out, plain_out) <= 1e-6
    _assert_same_state(model, plain)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("size", [8, 12])
def test_channels_last_with_1x1_maps_is_bitwise(mode, size):
    """Where the last maps are 1x1, channels_last and contiguous strides coincide: the light Functions' backward must
    still hand BatchNorm's backward the layout autograd does, or the bits differ."""
    base = DenseNet(**TINY).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, size, size).contiguous(memory_format=torch.channels_last)
    grads = {}
    for m in ("plain", mode):
        model = copy.deepcopy(base).set_memory(m)
        out = model(x)
        grads[m] = (out, *torch.autograd.grad(out.square().sum(), list(model.parameters())))
    for a, b in zip(grads[mode], grads["plain"], strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("mode", MODES)
def test_cpu_bf16_autocast(mode):
    base = DenseNet(**TINY)
    x = torch.randn(4, 3, 16, 16)
    results = {}
    for m in ("plain", mode):
        model = copy.deepcopy(base).set_memory(m).train()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = model(x)
        assert out.dtype == torch.bfloat16
        out.float().square().mean().backward()
        results[m] = (model, out)
    (model, out), (plain, plain_out) = results[mode], results["plain"]
    assert _relative(out, plain_out) <= 1e-6  # same bf16 arithmetic, recomputed
    _assert_same_state(model, plain)


@pytest.mark.parametrize("mode", MODES)
def test_float64_gradcheck(mode):
    model = DenseNet(growth_rate=2, block_config=(1, 1), num_init_features=4, num_classes=3, small_inputs=True,
                     memory=mode).double()
    weight_name = "features.denseblock1.denselayer1.conv1.weight"
    weight = model.get_parameter(weight_name).detach().clone().requires_grad_(True)
    x = torch.randn(2, 3, 4, 4, dtype=torch.float64, requires_grad=True)

    def fn(x, weight):
        return torch.func.functional_call(model, {weight_name: weight}, (x,))

    assert torch.autograd.gradcheck(fn, (x, weight), eps=1e-6, atol=1e-5, rtol=1e-4)


class _CountBatchNorms(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func.overloadpacket is torch.ops.aten.native_batch_norm
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("mode", MODES)
def test_recomputation_really_happens(mode):
    """A mode that silently stops recomputing (torchvision#2221) must fail here: backward reruns every norm."""
    model = DenseNet(**TINY, memory=mode)
    norms = sum(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    with _CountBatchNorms() as forward:
        out = model(torch.randn(2, 3, 16, 16))
    with _CountBatchNorms() as backward:
        out.sum().backward()
    assert forward.count == backward.count == norms
    model.memory = "plain"
    out = model(torch.randn(2, 3, 16, 16))
    with _CountBatchNorms() as backward:
        out.sum().backward()
    assert backward.count == 0


def test_no_checkpoint_when_autograd_is_not_recording(monkeypatch):
    def fail(*args, **kwargs):
        raise AssertionError("checkpoint called under no_grad")

    monkeypatch.setattr(recompute_module, "checkpoint", fail)
    model = DenseNet(**TINY, memory="frugal").eval()
    with torch.no_grad():
        model(torch.randn(2, 3, 16, 16))
    with torch.inference_mode():
        model(torch.randn(2, 3, 16, 16))


def _bn_layers_updated_twice(model: torch.nn.Module, x: torch.Tensor) -> int:
    for m in model.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.num_batches_tracked.zero_()
    model.train()(x).sum().backward()
    return sum(int(m.num_batches_tracked.item() == 2) for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


def test_peers_update_bn_twice_but_we_do_not():
    """torchvision's memory_efficient and timm's grad checkpointing update BN stats twice per step."""
    x = torch.randn(2, 3, 16, 16)
    tv = torchvision.models.DenseNet(growth_rate=4, block_config=(2, 2), num_init_features=8, memory_efficient=True)
    tm = timm.models.densenet.DenseNet(growth_rate=4, block_config=(2, 2), memory_efficient=True)
    assert _bn_layers_updated_twice(tv, x) == 4  # norm1 of every dense layer
    assert _bn_layers_updated_twice(tm, x) == 4
    for mode in ("plain", *MODES):
        assert _bn_layers_updated_twice(DenseNet(**TINY, memory=mode), x) == 0, mode


POOLS = {"max": (pool.MaxPool(), lambda t: F.max_pool2d(t, 3, 2, 1)),
         "avg": (pool.AvgPool(), lambda t: F.avg_pool2d(t, 2))}


@pytest.mark.parametrize("pool", POOLS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("channels_last", [False, True])
def test_pools_match_native_pooling_bitwise(pool, dtype, channels_last):
    ours, native = POOLS[pool]
    x = torch.randn(3, 5, 13, 10, dtype=dtype)  # odd sizes: partial windows, a dropped last row
    x[0, 0, :3, :3] = 1.0  # ties inside a max-pool window
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    grad = torch.randn_like(native(x))
    results = []
    for fn in (ours, native):
        leaf = x.detach().clone().requires_grad_(True)
        out = fn(leaf)
        out.backward(grad)
        results.append((out, leaf.grad))
    (out, grad_x), (ref, ref_grad) = results
    assert torch.equal(out, ref) and torch.equal(grad_x, ref_grad)
    assert grad_x.stride() == ref_grad.stride()


@pytest.mark.parametrize("pool", POOLS)
def test_pools_keep_no_input_for_backward(pool):
    ours, native = POOLS[pool]
    x = torch.randn(2, 4, 16, 16, requires_grad=True)
    with SavedTensorMeter() as meter:
        ours(x * 1)  # a non-leaf input, which native pooling would keep
    with SavedTensorMeter() as native_meter:
        native(x * 1)
    output_elements = 2 * 4 * 8 * 8
    assert native_meter.bytes >= x.numel() * 4
    assert meter.bytes == (output_elements * 4 if pool.startswith("max") else 0)  # int32 indices, or nothing


@pytest.mark.parametrize("mode", ["plain", *MODES])
def test_recomputation_never_updates_running_stats_nor_runs_a_transition_conv(mode, monkeypatch):
    """Each norm's own running buffers reach BatchNorm once per step, in forward; reruns get throwaway copies.
    A transition's conv never runs in backward."""
    own: dict[int, str] = {}
    updates, conv_calls = [], []
    real_batch_norm = norm_module.F.batch_norm

    def recording(x, running_mean, *args, **kwargs):
        if running_mean is not None and id(running_mean) in own:
            updates.append(own[id(running_mean)])
        return real_batch_norm(x, running_mean, *args, **kwargs)

    model = DenseNet(**TINY, memory=mode)
    own.update({id(m.running_mean): name for name, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)})
    monkeypatch.setattr(norm_module.F, "batch_norm", recording)
    model.features.transition1.conv.register_forward_hook(lambda *args: conv_calls.append(1))
    out = model(torch.randn(2, 3, 16, 16))
    assert sorted(updates) == sorted(own.values())  # every norm, once
    assert len(conv_calls) == 1
    out.sum().backward()
    assert sorted(updates) == sorted(own.values())
    assert len(conv_calls) == 1
    assert all(m.num_batches_tracked.item() == 1 for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hook", ["pruning", "scaled output", "scaled input"])
def test_hooks_that_change_what_a_module_computes_are_followed_in_backward(mode, hook):
    """A hook on a module inside a segment may change what it computes: ``torch.nn.utils.prune`` (a forward pre-hook
    that makes the weight from a mask), or a hook that scales an output or an input. Training steps follow it in
    backward, bitwise as the plain model."""
    state, x, runs = DenseNet(**TINY).state_dict(), torch.randn(4, 3, 16, 16), []
    for memory in ("plain", mode):
        model = DenseNet(**TINY, drop_rate=0.2, memory=memory)
        model.load_state_dict(state)
        inner = [m for name, m in model.named_modules() if name.startswith("features.") and name != "features.norm5"
                 and name.split(".")[-1].startswith(("conv", "norm", "relu", "pool"))]
        assert len(inner) == 4 + 4 * 6 + 4  # the stem's modules, each dense layer's, the transition's
        for module in inner:
            if hook == "pruning" and isinstance(module, torch.nn.Conv2d):
                torch.nn.utils.prune.l1_unstructured(module, "weight", amount=0.3)
            elif hook == "scaled output":
                module.register_forward_hook(lambda m, args, out: out * 1.5)
            elif hook == "scaled input":
                module.register_forward_pre_hook(lambda m, args: tuple(t * 1.5 for t in args))  # a norm's: its maps
        out = _steps(model, x)
        runs.append([out, *model.parameters(), *model.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("hooked", [False, True], ids=["", "hooked features"])
def test_an_empty_batch_trains_as_in_plain(mode, hooked):
    """A batch of no samples (a data pipeline's empty last batch) goes forward and backward as in plain: BatchNorm's
    backward kernel, which the light Functions call, fails on one with a floating-point exception that ends the
    process; a hooked ``features`` keeps its final ReLU's sign at a bit a value, of no samples."""
    state, runs = DenseNet(**TINY, drop_rate=0.2).state_dict(), []
    for memory in ("plain", mode):
        model = DenseNet(**TINY, drop_rate=0.2, memory=memory, backward_slices=2)
        model.load_state_dict(state)
        if hooked:
            model.features.register_forward_hook(lambda *args: None)
        x = torch.randn(0, 3, 16, 16, requires_grad=True)
        out = model(x)
        out.sum().backward()
        runs.append([out, x.grad, *(p.grad for p in model.parameters()), *model.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("mode", MODES)
def test_a_model_on_the_meta_device_goes_forward_and_backward(mode):
    """Shapes only, as tools that count FLOPs or plan memory without computing run a model (torchvision's does)."""
    model = DenseNet(**TINY, drop_rate=0.2, memory=mode, device="meta")
    x = torch.empty(4, 3, 16, 16, device="meta", requires_grad=True)
    model(x).sum().backward()
    assert x.grad.shape == x.shape and all(p.grad.shape == p.shape for p in model.parameters())


class _HalvedConv(torch.nn.Conv2d):
    """A convolution with a forward of its own, as quantisation-aware training's fake-quantised ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.weight * 0.5, None)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("change", ["spectral_norm", "spectral_norm, rerun in a checkpoint", "weight_norm",
                                    "a conv with a forward of its own", "a conv wrapped with an adapter"])
def test_convolutions_made_otherwise_train_like_plain(mode, change):
    """Parametrised weights (``torch.nn.utils.parametrizations``: spectral norm's power iteration runs on every read
    of the weight, in training), a convolution subclass with a forward of its own and a convolution wrapped with a LoRA
    adapter train bitwise as plain: the weight is read once a step, or, where a checkpoint's rerun reads it again (an
    activation other than ReLU), from the vectors the first run found; and the module's own forward is what runs."""
    state, x, runs = DenseNet(**TINY).state_dict(), torch.randn(4, 3, 16, 16), []
    for memory in ("plain", mode):
        # an adapted convolution never runs light: asked to slice, its segment still reruns as it is
        model = DenseNet(**TINY, memory=memory, backward_slices=2 if "adapter" in change else "auto",
                         act_layer="silu" if "checkpoint" in change else None)
        model.load_state_dict(state)
        torch.manual_seed(0)  # spectral norm draws its vectors
        for name, module in list(model.named_modules()):
            if type(module) is not torch.nn.Conv2d:
                continue
            if change.startswith("spectral_norm"):
                torch.nn.utils.parametrizations.spectral_norm(module)
            elif change == "weight_norm":
                torch.nn.utils.parametrizations.weight_norm(module)
            elif change == "a conv wrapped with an adapter":
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, Adapted(module))
            else:
                halved = _HalvedConv(module.in_channels, module.out_channels, module.kernel_size, module.stride,
                                     module.padding, bias=False)
                halved.load_state_dict(module.state_dict())
                parent, _, child = name.rpartition(".")
                setattr(model.get_submodule(parent), child, halved)
        out = _steps(model, x)
        runs.append([out, *model.parameters(), *model.buffers()])  # spectral norm's u and v among the buffers
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


class _SubclassedBatchNorm(torch.nn.BatchNorm2d):
    pass


def _put_in_place(model: DenseNet, change: str) -> DenseNet:
    if change == "timm's split batch norm":  # train.py --split-bn
        return timm.layers.convert_splitbn_model(model, num_splits=2)
    for name, norm in [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.BatchNorm2d)]:
        made = {"a BatchNorm2d subclass": lambda c: _SubclassedBatchNorm(c),
                # with a dropout of its own, which an adopted norm would drop: it stays as it is
                "timm's BatchNormAct2d": lambda c: timm.layers.BatchNormAct2d(
                    c, apply_act=False, drop_layer=functools.partial(torch.nn.Dropout, 0.0)),
                "instance norm with running statistics": lambda c: torch.nn.InstanceNorm2d(
                    c, affine=True, track_running_stats=True)}[change](norm.num_features)
        made.load_state_dict(norm.state_dict())
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent), child, made)
    return model


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("change", ["timm's split batch norm", "a BatchNorm2d subclass", "timm's BatchNormAct2d",
                                   "instance norm with running statistics"])
def test_norms_put_in_place_update_their_running_statistics_once(mode, change):
    """A norm put in place of one that effidense does not make its own (timm's ``convert_splitbn_model``, assignment)
    reruns as it is, in a checkpoint, and the rerun's updates to its buffers are put back: bitwise plain's."""
    state, x, runs = DenseNet(**TINY).state_dict(), torch.randn(4, 3, 16, 16), []
    for memory in ("plain", mode):
        model = DenseNet(**TINY, memory=memory, backward_slices=2)
        model.load_state_dict(state)
        model = _put_in_place(model, change)
        assert not any(type(m).__name__ == "BatchNormAct2d" and m.__module__.startswith("effidense")
                       for m in model.modules())
        out = _steps(model, x)
        runs.append([out, *model.parameters(), *model.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("mode", MODES)
def test_a_norm_layer_with_buffers_of_its_own_trains_like_plain(mode):
    """A norm that keeps buffers and is not BatchNorm (timm's EvoNorm2dB0: a running variance) reruns, in a
    checkpoint, from the buffers its first run found: bitwise plain's, its running variance included."""
    state, x, runs = DenseNet(**TINY, norm_layer=timm.layers.EvoNorm2dB0).state_dict(), torch.randn(4, 3, 16, 16), []
    for memory in ("plain", mode):
        model = DenseNet(**TINY, norm_layer=timm.layers.EvoNorm2dB0, memory=memory, backward_slices=2)
        model.load_state_dict(state)
        out = _steps(model, x)
        runs.append([out, *model.parameters(), *model.buffers()])
    assert len(list(model.buffers())) > 10
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def _weights_given(model: torch.nn.Module, x: torch.Tensor, inner_steps: int) -> list[torch.Tensor]:
    """A meta-learning step (MAML's): ``inner_steps`` SGD steps on weights given through ``functional_call``, each
    differentiable (``create_graph=True``), then the outer loss on the weights they reach; returns that loss and its
    gradients with respect to the model's own parameters."""
    from torch.func import functional_call
    params = dict(model.named_parameters())
    weights = {name: 1.5 * p + 0.01 for name, p in params.items()}  # not the module's: gone once a call returns
    for _ in range(inner_steps):
        inner = functional_call(model, weights, (x,)).square().mean()
        grads = torch.autograd.grad(inner, list(weights.values()), create_graph=True)
        weights = {name: w - 0.1 * g for (name, w), g in zip(weights.items(), grads, strict=True)}
    torch.manual_seed(3)
    outer = functional_call(model, weights, (x * 0.5,)).square().mean()
    return [outer.detach(), *torch.autograd.grad(outer, list(params.values()))]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["light", "checkpointed", "sliced"])
@pytest.mark.parametrize("inner_steps", [0, 2])
def test_weights_given_through_functional_call_are_the_ones_differentiated(mode, kind, inner_steps):
    """Weights given for one call (``torch.func.functional_call``, as MAML's inner loop and hypernetworks give them)
    are gone from the modules by backward: a rerun, a checkpoint's or a light segment's under ``create_graph=True``,
    and a sliced backward still use them. Plain's gradients: bitwise in one pass; through two differentiable inner
    steps (float64), up to the order of sums."""
    config = dict(TINY, drop_rate=0.2, **{"light": {}, "checkpointed": dict(act_layer="silu"),
                                         "sliced": dict(backward_slices=2)}[kind])
    dtype = torch.float64 if inner_steps else torch.float32
    x, runs = torch.randn(4, 3, 16, 16, dtype=dtype), []
    for memory in ("plain", mode):
        torch.manual_seed(0)
        runs.append(_weights_given(DenseNet(**config, memory=memory).to(dtype), x, inner_steps))
    if inner_steps or kind == "sliced":
        for a, b in zip(*runs, strict=True):
            torch.testing.assert_close(b, a, rtol=1e-9 if inner_steps else 1e-5, atol=1e-12 if inner_steps else 1e-7)
    else:
        assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("act_layer", ["relu", "silu"])
def test_statistics_given_through_functional_call_are_the_ones_used_in_eval_mode(mode, act_layer):
    """Running statistics given for one call with the weights (``functional_call(model, (weights, buffers), x)``, in
    eval mode: a frozen-norm fine-tune) are those its checkpoints rerun with: plain's gradients, bitwise."""
    from torch.func import functional_call
    x, runs = torch.randn(4, 3, 16, 16), []
    for memory in ("plain", mode):
        torch.manual_seed(0)
        model = DenseNet(**TINY, memory=memory, act_layer=act_layer).eval()
        weights = {name: (1.5 * p + 0.01).detach().requires_grad_() for name, p in model.named_parameters()}
        buffers = {name: 1.3 * b + 0.1 if b.is_floating_point() else b for name, b in model.named_buffers()}
        loss = functional_call(model, (weights, buffers), (x,)).square().mean()
        runs.append([loss.detach(), *torch.autograd.grad(loss, list(weights.values()))])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("mode", ["plain", *MODES])
@pytest.mark.parametrize("kind", ["light", "checkpointed", "sliced"])
@pytest.mark.parametrize("weight", ["features.denseblock1.denselayer1.conv2.weight",
                                    "features.denseblock1.denselayer2.norm1.weight", "features.norm5.weight"])
def test_a_weight_changed_in_place_before_backward_fails_as_in_plain(mode, kind, weight):
    """A weight changed in place between forward and backward fails backward with autograd's own message, as where
    the plain model's kernels saved it, rather than rerun a segment with a weight forward did not use."""
    config = {"light": {}, "checkpointed": dict(act_layer="silu"), "sliced": dict(backward_slices=2)}[kind]
    model = DenseNet(**TINY, **config, memory=mode)
    loss = model(torch.randn(4, 3, 16, 16)).square().sum()
    with torch.no_grad():
        model.get_parameter(weight).mul_(1.01)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()
    assert not torch.nn.modules.module._global_forward_pre_hooks  # the failed rerun left none of its own
    assert not recompute_module.recomputing()


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("setting", ["set_checkpoint_debug_enabled", "set_checkpoint_early_stop"])
def test_checkpoint_settings_of_ones_own_leave_the_modes_exact(mode, setting):
    """torch.utils.checkpoint's global settings, as a user sets them for checkpoints of their own (debug mode, which
    torch's own checkpoint errors suggest; no early stop), leave every mode working and bitwise plain's: two SGD steps
    with every segment checkpointed (SiLU)."""
    import torch.utils.checkpoint as checkpoint
    value = setting == "set_checkpoint_debug_enabled"
    state, x, runs = DenseNet(**TINY).state_dict(), torch.randn(4, 3, 16, 16), []
    for memory in ("plain", mode):
        model = DenseNet(**TINY, memory=memory, act_layer="silu")
        model.load_state_dict(state)
        with getattr(checkpoint, setting)(value):
            out = _steps(model, x)
        runs.append([out, *model.parameters(), *model.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


def _wrap_in_checkpoints(model: DenseNet, wrapper: str, x: torch.Tensor) -> torch.Tensor:
    """``model(x)`` under checkpoints of the user's own."""

    from torch.distributed.algorithms._checkpoint import checkpoint_wrapper as wrapping
    from torch.utils.checkpoint import checkpoint, checkpoint_sequential
    if wrapper == "whole model":
        return checkpoint(model, x, use_reentrant=False)
    if wrapper.startswith("checkpoint_sequential"):
        reentrant = "reentrant" in wrapper
        features = checkpoint_sequential(model.features, 2, x.requires_grad_(reentrant), use_reentrant=reentrant)
        return model.forward_head(F.relu(features))
    impl = wrapping.CheckpointImpl.NO_REENTRANT
    wrapping.apply_activation_checkpointing(
        model, checkpoint_wrapper_fn=functools.partial(wrapping.checkpoint_wrapper, checkpoint_impl=impl),
        check_fn=lambda m: isinstance(m, DenseLayer))
    return model(x)


@pytest.mark.parametrize("mode", ["plain", *MODES, "frugal, sliced"])
@pytest.mark.parametrize("wrapper", ["apply_activation_checkpointing", "checkpoint_sequential",
                                     "checkpoint_sequential, reentrant", "whole model"])
def test_checkpoints_of_ones_own_around_the_model_train_like_plain(mode, wrapper):
    """A checkpoint the user puts around dense layers (FSDP's ``apply_activation_checkpointing``), the features or the
    whole model reruns them in backward: the plain model's gradients and running statistics, updated once
    (torchvision's and timm's update twice there; a wrapped layer failed on the list its block had added to since).
    Bitwise, or in float64 within the order of sums where sliced."""
    config = dict(TINY, drop_rate=0.2)
    x, state = torch.randn(4, 3, 16, 16, dtype=torch.float64), _perturb_bn(DenseNet(**config)).state_dict()
    runs = []
    for memory, wrapped in (("plain", None), (mode, wrapper)):
        model = DenseNet(**config, memory=memory.split(",")[0], backward_slices=2 if "sliced" in memory else "auto")
        model.load_state_dict(state)
        model.double()
        torch.manual_seed(1)
        out = model(x) if wrapped is None else _wrap_in_checkpoints(model, wrapped, x.clone())
        out.square().mean().backward()
        runs.append([out, *(p.grad for p in model.parameters()), *model.buffers()])
    tol = 1e-9 if "sliced" in mode else 0.0
    assert all(_relative(a, b) <= tol for a, b in zip(*runs, strict=True))


def _backward_after_eval(model: torch.nn.Module, x: torch.Tensor, second_order: bool) -> list[torch.Tensor]:
    """A training forward, then ``model.eval()`` before backward (a validation pass may come between): the loss, its
    gradients and the buffers. ``second_order``: the loss is the input gradient's squared norm (a gradient penalty)."""
    torch.manual_seed(1)
    xi = x.clone().requires_grad_(second_order)
    loss = model(xi).square().mean()
    model.eval()
    if second_order:
        (grad,) = torch.autograd.grad(loss, xi, create_graph=True)
        loss = grad.square().sum()
    loss.backward()
    return [loss.detach(), *(p.grad for p in model.parameters()), *model.buffers()]


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("kind", ["light", "checkpointed", "sliced", "fused"])
@pytest.mark.parametrize("second_order", [False, True])
def test_backward_after_model_eval_is_plains(mode, kind, second_order):
    """Backward after ``model.eval()`` goes back through what the training forward computed: its reruns run the
    modules in forward's mode, and its dropout masks are drawn again as drawn in training. The plain model's loss,
    gradients and buffers (float64, within the order of sums); a rerun in eval mode crashed the process."""
    config = dict(TINY, drop_rate=0.3, **{"light": {}, "checkpointed": dict(act_layer="silu"),
                                         "sliced": dict(backward_slices=2), "fused": {}}[kind])
    x = torch.randn(4, 3, 16, 16, dtype=torch.float64)
    if kind == "fused":  # a block's last layer and the transition after it as one checkpoint
        config = dict(growth_rate=16, block_config=(4, 1), num_init_features=8, bn_size=None, num_classes=5,
                      drop_rate=0.2, small_inputs=True, backward_slices=2)
        x = torch.randn(4, 3, 32, 32, dtype=torch.float64)
    runs = []
    for memory in ("plain", mode):
        torch.manual_seed(0)
        runs.append(_backward_after_eval(DenseNet(**config, memory=memory).double(), x, second_order))
    for a, b in zip(*runs, strict=True):
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


class _MaxNormConv(torch.nn.Conv2d):
    """A convolution that holds its weight within bounds by changing it in place as it runs."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            self.weight.clamp_(-0.2, 0.2)
        return super().forward(x)


@pytest.mark.parametrize("mode", MODES)
def test_a_module_that_changes_its_weight_as_it_runs_trains_like_plain(mode):
    """A weight a module changes in place in its own forward (a max-norm constraint) is the weight forward used: its
    checkpoint reruns with it, without taking it for one changed before backward. Two SGD steps bitwise plain's."""
    state, x, runs = DenseNet(**TINY).state_dict(), torch.randn(4, 3, 16, 16), []
    for memory in ("plain", mode):
        model = DenseNet(**TINY, memory=memory, act_layer="silu")
        model.load_state_dict(state)
        layer = model.features.denseblock1.denselayer1
        conv = _MaxNormConv(layer.conv2.in_channels, layer.conv2.out_channels, 3, padding=1, bias=False)
        conv.load_state_dict(layer.conv2.state_dict())
        layer.conv2 = conv
        out = _steps(model, x)
        runs.append([out, *model.parameters(), *model.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore:Please use quant_min:UserWarning")
@pytest.mark.parametrize("mode", MODES)
def test_quantisation_aware_training_trains_like_plain(mode):
    """Quantisation-aware training (``torch.ao.quantization.prepare_qat``): its convolutions run in checkpoints, and
    their fake-quantisers update their observers' moving averages without calling them, which a rerun still
    replays from the first run's: three SGD steps (from the second, an average that moves twice shows) bitwise plain's,
    every observer's buffers included."""
    quantization = pytest.importorskip("torch.ao.quantization")
    state, x, runs = DenseNet(**TINY).state_dict(), torch.randn(4, 3, 16, 16), []
    for memory in ("plain", mode):
        model = DenseNet(**TINY, memory=memory)
        model.load_state_dict(state)
        model.qconfig = quantization.get_default_qat_qconfig("x86")
        quantization.prepare_qat(model, inplace=True)
        out = _steps(model, x, steps=3)
        runs.append([out, *model.parameters(), *model.buffers()])
    assert len(runs[0]) > 100
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("mode", ["plain", *MODES])
@pytest.mark.parametrize("training", [False, True])
def test_torch_func_per_sample_gradients_are_torchvisions(mode, training):
    """``torch.func`` (``vmap`` of ``grad``: per-sample gradients, as Opacus and influence functions take them) runs
    the model as the plain one, in every mode: torchvision's gradients, in eval mode and in training with its
    norms' running statistics dropped (``replace_all_batch_norm_modules_``, which torch.func needs)."""
    from torch.func import functional_call, grad, replace_all_batch_norm_modules_, vmap
    torch.manual_seed(0)
    reference = torchvision.models.DenseNet(**TINY)
    model = DenseNet(**TINY, memory=mode)
    model.load_state_dict(reference.state_dict())
    x = torch.randn(3, 1, 3, 16, 16)
    per_sample = []
    for net in (reference, model):
        if training:
            replace_all_batch_norm_modules_(net)
        net.train(training)
        params = {k: v.detach() for k, v in net.named_parameters()}
        buffers = dict(net.named_buffers())

        def loss(params: dict, sample: torch.Tensor, net: torch.nn.Module = net, buffers: dict = buffers):
            return functional_call(net, (params, buffers), (sample,)).square().sum()

        per_sample.append(vmap(grad(loss), in_dims=(None, 0))(params, x))
    theirs, ours = per_sample
    assert ours.keys() == theirs.keys()
    assert all(torch.allclose(ours[k], theirs[k], rtol=1e-5, atol=1e-6) for k in theirs)


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:FutureWarning")  # torch's own, in make_dual
@pytest.mark.parametrize("mode", ["plain", *MODES])
def test_forward_mode_ad_is_torchvisions(mode):
    """Forward-mode AD (``torch.autograd.forward_ad``: a Jacobian-vector product in one pass) runs the model on
    torch's own ops, which define it: torchvision's outputs, tangents and running statistics, bitwise, through the
    feature API and a hooked block too."""
    import torch.autograd.forward_ad as forward_ad
    torch.manual_seed(0)
    reference = torchvision.models.DenseNet(**TINY)
    model = DenseNet(**TINY, memory=mode)
    model.load_state_dict(reference.state_dict())
    model.features.denseblock1.register_forward_hook(lambda *args: None)
    x, tangent = torch.randn(4, 3, 16, 16), torch.randn(4, 3, 16, 16)
    runs = []
    for net in (reference, model):
        with forward_ad.dual_level():
            out = forward_ad.unpack_dual(net(forward_ad.make_dual(x, tangent)))
            runs.append([out.primal, out.tangent, *net.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))
    with forward_ad.dual_level():
        final, (block,) = model.forward_intermediates(forward_ad.make_dual(x, tangent), indices=[1])
        assert forward_ad.unpack_dual(block).tangent is not None
        assert forward_ad.unpack_dual(final).tangent is not None


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("norms", ["without affine parameters", "in eval mode inside a training model"])
def test_norms_built_or_set_otherwise_train_like_plain(mode, norms):
    """BatchNorm without affine parameters (``affine=False``: the model builds, as torchvision's initialisation would
    not let it), and norms set to eval mode inside a training model (their statistics frozen, as detection
    fine-tuning does): two SGD steps bitwise plain's."""
    from functools import partial

    from effidense.layers.norm import BatchNormAct2d
    config = dict(TINY, norm_layer=partial(BatchNormAct2d, affine=False)) if norms.startswith("without") else TINY
    state, x, runs = DenseNet(**config).state_dict(), torch.randn(4, 3, 16, 16), []
    for memory in ("plain", mode):
        model = DenseNet(**config, memory=memory)
        model.load_state_dict(state)
        if norms.startswith("in eval"):
            for module in model.features.denseblock1.modules():
                if isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
                    module.eval()
        out = _steps(model, x)
        runs.append([out, *model.parameters(), *model.buffers()])
    assert all(torch.equal(a, b) for a, b in zip(*runs, strict=True))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", MODES)
def test_half_precision_models_train_like_plain(dtype, mode):
    """model.half()/.bfloat16() trains in every mode and matches plain in the same dtype bitwise."""
    plain, model = DenseNet(**TINY, memory="plain"), DenseNet(**TINY, memory=mode)
    model.load_state_dict(plain.state_dict())
    x = torch.randn(2, 3, 32, 32, dtype=dtype)
    outs = []
    for m in (plain.to(dtype).train(), model.to(dtype).train()):
        out = m(x)
        out.float().square().mean().backward()
        outs.append(out)
    assert outs[1].dtype == dtype and torch.equal(outs[0], outs[1])
    for (name, p), q in zip(model.named_parameters(), plain.parameters(), strict=True):
        assert p.grad.dtype == dtype and torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(model.named_buffers(), plain.buffers(), strict=True):
        assert torch.equal(b, c), name


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_synchronised_statistics_path_takes_half_precision_parameters(dtype, monkeypatch):
    """The synchronised norms' path keeps statistics in float32 and gives the half-precision affine parameters
    gradients in their own dtype, close to native BatchNorm's (one process: its sums are the group's)."""
    monkeypatch.setattr(norm_module.dist, "all_reduce", lambda tensor, group=None: None)
    norm = torch.nn.BatchNorm2d(6).to(dtype).train()
    torch.nn.init.uniform_(norm.weight, 0.5, 1.5)
    x = torch.randn(4, 6, 5, 5, dtype=dtype, requires_grad=True)
    mean, var, _ = norm_module.batch_stats(x, None)
    assert mean.dtype == torch.float32
    out = norm_module.SyncBatchNormWithStats.apply(x, norm.weight, norm.bias, mean, var, norm.eps, None)
    probe = torch.rand(out.shape) + 0.5  # a loss without cancellation, so half-precision rounding stays relative
    grads = torch.autograd.grad((out.float() * probe).sum(), (x, norm.weight, norm.bias))
    reference = torch.nn.functional.batch_norm(x.float(), None, None, norm.weight.float(), norm.bias.float(), True)
    expected = torch.autograd.grad((reference * probe).sum(), (x, norm.weight, norm.bias))
    assert out.dtype == dtype and [g.dtype for g in grads] == [dtype] * 3
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)
    for got, want in zip(grads, expected, strict=True):
        torch.testing.assert_close(got.float(), want.float(), rtol=5e-2, atol=5e-2)


@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("amp", [None, torch.bfloat16])
def test_efficient_light_reruns_are_bitwise_plain(channels_last, amp):
    """The light reruns (the norms' then_conv for every concatenation, bottleneck and transition, and between for the
    stem) run autograd's own backward kernels: outputs, every gradient and every buffer are bitwise the plain model's,
    with autocast and channels_last too."""
    base = DenseNet(**TINY, memory="plain")
    x = torch.randn(3, 3, 32, 32)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    runs = []
    for mode in ("plain", "efficient"):
        model = copy.deepcopy(base).set_memory(mode).train()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        with torch.autocast("cpu", dtype=amp or torch.float32, enabled=amp is not None):
            out = model(x)
        out.float().square().mean().backward()
        runs.append((out, model))
    (out, plain), (eff_out, efficient) = runs
    assert torch.equal(out, eff_out)
    for (name, p), q in zip(efficient.named_parameters(), plain.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    for (name, b), c in zip(efficient.named_buffers(), plain.buffers(), strict=True):
        assert torch.equal(b, c), name
