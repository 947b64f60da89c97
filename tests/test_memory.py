"""The memory meter, and the margins each mode must keep (measured through the meter, never by time)."""
import pytest
import torch
from torch.utils.checkpoint import checkpoint

from effidense import DenseNet, SavedTensorMeter, activation_floor_bytes, densenet121, saved_activation_bytes

SMALL_BC = dict(growth_rate=12, block_config=(4, 4, 4), num_init_features=24, small_inputs=True, num_classes=10)


def test_meter_deduplicates_storages_and_excludes_parameters():
    linear = torch.nn.Linear(256, 256)
    x = torch.randn(64, 256, requires_grad=True)
    with SavedTensorMeter(exclude=linear) as meter:
        y = linear(x)  # saves x and the weight: only x counts
        z = (y * y).sum()  # saves y twice: counted once
    assert meter.bytes == x.numel() * 4 + y.numel() * 4
    assert meter.num_storages == 2
    z.backward()


def test_meter_counts_a_view_as_its_whole_storage():
    base = torch.randn(8, 1024, requires_grad=True)
    with SavedTensorMeter() as meter:
        a = base * 2
        a[:1].exp()  # exp saves its output, a fresh 1x1024 tensor
        a[:1].sin()  # sin saves its input, a view of a's whole 8x1024 storage
    assert meter.bytes == 1024 * 4 + 8 * 1024 * 4


def test_meter_sees_inputs_a_non_reentrant_checkpoint_keeps():
    x = torch.randn(32, 32, requires_grad=True)
    with SavedTensorMeter() as meter:
        checkpoint(lambda t: t.sin().cos(), x, use_reentrant=False)
    assert meter.bytes == x.numel() * 4  # only the input: sin/cos results are rebuilt in backward


def test_meter_counts_nothing_without_autograd():
    model = DenseNet(**SMALL_BC, memory="plain")
    with torch.no_grad(), SavedTensorMeter(exclude=model) as meter:
        model(torch.randn(2, 3, 32, 32))
    assert meter.bytes == 0


def test_modes_keep_their_memory_margins():
    model = DenseNet(**SMALL_BC)
    x = torch.randn(4, 3, 32, 32)
    plain, efficient, frugal = (saved_activation_bytes(model.set_memory(m), x)
                                for m in ("plain", "efficient", "frugal"))
    floor = activation_floor_bytes(model, x)
    assert plain / efficient >= 2.8  # 3.06x measured
    assert plain / frugal >= 11  # 12.05x measured
    assert frugal <= 1.05 * floor  # frugal keeps essentially only what cannot be recomputed


def test_densenet121_shape_of_the_floor():
    """The floor counts exactly: image + block inputs + 58 layers' new features (batch 1, 64x64)."""
    model = densenet121()
    x = torch.randn(1, 3, 64, 64)
    layer_maps = 6 * 32 * 16 * 16 + 12 * 32 * 8 * 8 + 24 * 32 * 4 * 4 + 16 * 32 * 2 * 2
    block_inputs = 64 * 16 * 16 + 128 * 8 * 8 + 256 * 4 * 4 + 512 * 2 * 2
    assert activation_floor_bytes(model, x) == 4 * (3 * 64 * 64 + layer_maps + block_inputs)


@pytest.mark.parametrize("mode", ["plain", "efficient", "frugal"])
def test_meter_is_deterministic(mode):
    model = DenseNet(**SMALL_BC, memory=mode)
    x = torch.randn(2, 3, 32, 32)
    assert saved_activation_bytes(model, x) == saved_activation_bytes(model, x)


HOOKED = dict(growth_rate=4, block_config=(2, 2, 2), num_init_features=8, num_classes=5)


@pytest.mark.parametrize("mode", ["plain", "efficient", "frugal"])
def test_a_no_op_forward_hook_on_any_module_moves_no_memory_and_no_bit(mode):
    """Hooks see what torchvision's would, and the model takes its own path all the same: saved bytes move by under
    1%, and outputs, gradients and running statistics stay bitwise."""
    torch.manual_seed(0)
    x = torch.randn(2, 3, 48, 48)
    reference = DenseNet(**HOOKED, memory=mode)
    state = {k: v.clone() for k, v in reference.state_dict().items()}
    unhooked = saved_activation_bytes(reference, x)
    reference.load_state_dict(state)
    out = reference(x)
    out.square().sum().backward()
    for name, module in reference.named_modules():
        if not name:
            continue
        model = DenseNet(**HOOKED, memory=mode)
        model.load_state_dict(state)
        seen = []
        module = model.get_submodule(name)
        module.register_forward_hook(lambda m, args, output, seen=seen: seen.append(output))
        hooked = saved_activation_bytes(model, x)
        assert seen, f"the hook on {name} did not fire"
        assert abs(hooked - unhooked) < 0.01 * unhooked, (name, hooked, unhooked)
        model.load_state_dict(state)
        hooked_out = model(x)
        hooked_out.square().sum().backward()
        assert torch.equal(hooked_out, out), name
        for (key, p), q in zip(model.named_parameters(), reference.parameters(), strict=True):
            assert torch.equal(p.grad, q.grad), (name, key)
        for (key, b), c in zip(model.named_buffers(), reference.buffers(), strict=True):
            assert torch.equal(b, c), (name, key)


@pytest.mark.parametrize("bn_size", [4, None])
def test_efficient_and_frugal_keep_no_dropout_mask(bn_size):
    """A dense layer's dropout runs inside its last segment, whose backward draws the mask again: with dropout the
    modes keep exactly what they keep without it, where plain keeps each mask too."""
    x = torch.randn(2, 3, 32, 32)
    config = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5, bn_size=bn_size)
    for mode in ("plain", "efficient", "frugal"):
        dropped, kept = (saved_activation_bytes(DenseNet(**config, drop_rate=p, memory=mode).train(), x)
                         for p in (0.2, 0.0))
        assert dropped > kept if mode == "plain" else dropped == kept, mode
