"""effidense.harness.shapes: fake kernels' answers remembered across batch sizes count a step exactly as before."""
from __future__ import annotations

import contextlib

import pytest
import torch
from conftest import TINY
from torch._subclasses.fake_tensor import FakeTensorMode

import effidense.harness.footprint as footprint
import effidense.harness.shapes as shapes
from effidense import DenseNet, FCDenseNet
from effidense.harness import StepProbe, StepSpec, build_variant
from effidense.harness.shapes import BatchFreeShapes
from effidense.modelspec import ModelSpec

aten = torch.ops.aten

FC_TINY = dict(spatial_dims=2, in_channels=3, out_channels=4, down_blocks=(2, 2), up_blocks=(2, 2),
               bottleneck_layers=2, growth_rate=4, init_features=8)
BUILDS = {
    "frugal sliced, bf16 autocast": (lambda: DenseNet(**TINY, memory="frugal", backward_slices=3),
                                     StepSpec(num_classes=TINY["num_classes"], amp=torch.bfloat16), (16, 16)),
    "efficient 3D": (lambda: DenseNet(**TINY, memory="efficient", spatial_dims=3, in_chans=1),
                     StepSpec(in_chans=1, num_classes=TINY["num_classes"], optimizer="adamw"), (8, 8, 8)),
    "torchvision memory_efficient": (lambda: build_variant("tv", ModelSpec("tiny", TINY)),
                                     StepSpec(num_classes=TINY["num_classes"]), (16, 16)),
    "FC-DenseNet with dropout": (lambda: FCDenseNet(**FC_TINY, memory="frugal", backward_slices=2),
                                 StepSpec(num_classes=4), (13, 10)),
}


@pytest.mark.parametrize("name", list(BUILDS))
def test_a_step_counts_the_same_with_remembered_shapes(monkeypatch, name):
    """A step at a batch whose kernels are answered from another batch's counts every storage as the fake kernels
    would: the same peak, the same split at the peak, the same saved bytes and the same end."""
    build, spec, size = BUILDS[name]
    probe = StepProbe(build, spec)
    probe.measure(7, size)  # remembers
    answered = []
    made, written = shapes._made, shapes._written
    monkeypatch.setattr(shapes, "_made", lambda *a: answered.append(1) or made(*a))
    monkeypatch.setattr(shapes, "_written", lambda *a: answered.append(1) or written(*a))
    remembered = probe.measure(5, size)
    assert len(answered) > 100  # most kernels were answered from memory
    monkeypatch.setattr(footprint, "BatchFreeShapes", contextlib.nullcontext)
    assert remembered == probe.measure(5, size)


def test_the_batch_must_be_told_apart_to_be_remembered():
    """A batch that equals another dim, a concatenation of samples, a batch of one, or an output resized to fit is
    left to the fake kernel."""
    def remembered(func):
        return sum(key[0] is func for key in BatchFreeShapes.remembered)

    BatchFreeShapes.remembered.clear()
    with FakeTensorMode(), BatchFreeShapes():
        weight = torch.ones(6)
        for x in (torch.randn(6, 6, 3, 3), torch.randn(1, 6, 3, 3)):
            aten.native_batch_norm(x, weight, weight, None, None, True, 0.1, 1e-5)
        torch.cat([torch.randn(4, 6), torch.randn(4, 6)])
        assert remembered(aten.native_batch_norm.default) == remembered(aten.cat.default) == 0
        x = torch.randn(4, 6, 3, 3)
        out = aten.native_batch_norm(x, weight, weight, None, None, True, 0.1, 1e-5)
        assert remembered(aten.native_batch_norm.default) == 1
        again = aten.native_batch_norm(torch.randn(9, 6, 3, 3).to(memory_format=torch.channels_last), weight,
                                       weight, None, None, True, 0.1, 1e-5)
        assert remembered(aten.native_batch_norm.default) == 2  # another layout is another call
        answered = aten.native_batch_norm(torch.randn(9, 6, 3, 3), weight, weight, None, None, True, 0.1, 1e-5)
        assert remembered(aten.native_batch_norm.default) == 2
        resized = torch.empty(0)  # an output resized to fit is a new storage each time: never answered from memory
        torch.sub(x, x, out=resized)
        assert resized.shape == x.shape and remembered(aten.sub.out) == 0
        torch.sub(x, x, out=resized)
        assert remembered(aten.sub.out) == 1
    assert answered[0].shape == (9, 6, 3, 3) and answered[0].stride() == out[0].stride()
    assert [t.shape for t in answered[1:]] == [t.shape for t in out[1:]]
    assert again[0].stride() != answered[0].stride()
