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
