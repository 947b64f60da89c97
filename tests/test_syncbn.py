"""nn.SyncBatchNorm: converted models use global batch statistics and gradients under DDP and FSDP2's
``fully_shard`` (CPU, gloo, 2 ranks).

One spawned 2-process group runs every scenario for every memory mode; the ranks save their measurements and the
tests here judge them. Differences are relative: max |a - b| over a group of tensors / max |b| over them.
"""
from __future__ import annotations

import copy
import gc
import os
from datetime import timedelta

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
import torchvision
from conftest import TINY
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel

from effidense import MEMORY_MODES, DenseNet
from effidense.harness import free_port
from effidense.harness.distributed import ddp_model

WORLD = 2
BATCH = 4  # per rank
SIZE = 16
TOL = 1e-5
# A converted model trained on this rank's part of the batch against one process on the full batch:
# name: (images per rank, dtype, channels_last, BN momentum, bf16 autocast, wrapped in DDP, tolerance)
VARIANTS = {
    "even": ((BATCH, BATCH), torch.float32, False, 0.1, False, True, TOL),
    "uneven": ((3, 5), torch.float32, False, 0.1, False, True, TOL),
    # DDP itself does not synchronise gradients when a rank has an empty batch: average them by hand
    "empty rank": ((0, 2 * BATCH), torch.float32, False, 0.1, False, False, TOL),
    "fp64": ((BATCH, BATCH), torch.float64, False, 0.1, False, True, 1e-12),
    "channels_last": ((BATCH, BATCH), torch.float32, True, 0.1, False, True, TOL),
    "momentum None": ((BATCH, BATCH), torch.float32, False, None, False, True, TOL),
    "autocast bf16": ((BATCH, BATCH), torch.float32, False, 0.1, True, True, 2e-2),
}
# Collectives effidense itself issues for the TINY DenseNet-BC, fully converted: two all-reduces (sums and counts,
# then squared deviations) per feature map (the stem's; per block the input, two layer outputs, two bottlenecks),
# one per norm in backward (norm0, 4 per block, transition1, norm5). Recomputation must add none.
FORWARD_COLLECTIVES = 2 * (1 + 5 + 5)
BACKWARD_COLLECTIVES = 1 + 4 + 1 + 4 + 1
# Partly converted: the first block's second layer and the final norm synchronise, the rest do not, so norms that
# share a block's statistics cache disagree on synchronisation.
# what fully_shard wraps before the whole model; checkpointed: each layer also under FSDP's activation checkpointing,
# whose rerun must not update running statistics again
SHARDED_UNITS = ("DenseLayer", "DenseBlock", "DenseLayer, checkpointed")
MIXED = ("features.denseblock1.denselayer2.norm1", "features.denseblock1.denselayer2.norm2", "features.norm5")


def _rel(actual: list[Tensor], expected: list[Tensor]) -> float:
    assert [a.shape for a in actual] == [e.shape for e in expected]
    pairs = [(a.double(), e.double()) for a, e in zip(actual, expected, strict=True) if e.numel()]
    if not pairs:
        return 0.0
    return max(float((a - e).abs().max()) for a, e in pairs) / max(float(e.abs().max()) for _, e in pairs)


def _grads(model: nn.Module) -> list[Tensor]:
    return [p.grad for p in model.parameters()]


def _float_buffers(model: nn.Module) -> list[Tensor]:
    return [b for b in model.buffers() if b.is_floating_point()]


def _counts(model: nn.Module) -> list[int]:
    return [int(b) for b in model.buffers() if not b.is_floating_point()]


class _Counter:
    """Counts torch.distributed.all_reduce calls (DDP's own gradient all-reduce goes through C++, not this)."""

    def __init__(self) -> None:
        self.calls = 0
        self._original = dist.all_reduce

    def __enter__(self) -> _Counter:
        def counting(*args, **kwargs):
            self.calls += 1
            return self._original(*args, **kwargs)

        dist.all_reduce = counting
        return self

    def __exit__(self, *exc) -> None:
        dist.all_reduce = self._original


class _ReferenceSyncBN(nn.BatchNorm2d):
    """Independent reference: BatchNorm over every rank's batch, differentiated by autograd through
    torch.distributed.nn's differentiable all-reduce."""

    def forward(self, x: Tensor) -> Tensor:
        from torch.distributed.nn.functional import all_reduce

        n = all_reduce(torch.full((1,), float(x.numel() // x.size(1))))
        mean = all_reduce(x.sum((0, 2, 3))) / n
        var = all_reduce((x - mean.view(1, -1, 1, 1)).square().sum((0, 2, 3))) / n
        with torch.no_grad():
            self.num_batches_tracked += 1
            self.running_mean.mul_(1 - self.momentum).add_(mean * self.momentum)
            self.running_var.mul_(1 - self.momentum).add_(var * n / (n - 1) * self.momentum)
        x = (x - mean.view(1, -1, 1, 1)) * torch.rsqrt(var + self.eps).view(1, -1, 1, 1)
        return x * self.weight.view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)


def _reference_sync(norm: nn.BatchNorm2d) -> _ReferenceSyncBN:
    ref = _ReferenceSyncBN(norm.num_features, norm.eps, norm.momentum)
    ref.load_state_dict(norm.state_dict())
    return ref


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent), child, module)


def _step(model: nn.Module, x: Tensor, y: Tensor, scale: float) -> tuple[Tensor, dict[str, int]]:
    """Forward and backward of ``scale`` * the summed cross-entropy; returns the output and all_reduce counts."""
    with _Counter() as forward:
        out = model(x)
    with _Counter() as backward:
        (F.cross_entropy(out, y, reduction="sum") * scale).backward()
    return out.detach(), {"forward": forward.calls, "backward": backward.calls}


def _against_full_batch(base: DenseNet, mode: str, x: Tensor, y: Tensor, rank: int, variant: str) -> dict:
    """One training step of the converted model on this rank's part against the unconverted one on the full batch."""
    sizes, dtype, channels_last, momentum, amp, ddp, _ = VARIANTS[variant]
    base = copy.deepcopy(base).to(dtype).set_memory(mode).train()
    for m in base.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.momentum = momentum
    x = x.to(dtype, memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    part = slice(sum(sizes[:rank]), sum(sizes[:rank + 1]))
    full = x.size(0)
    reference = copy.deepcopy(base)
    model = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
        ref_out, _ = _step(reference, x, y, 1 / full)  # the mean over the full batch
        # Rank r's loss: (WORLD / full) * its summed loss. Through SyncBatchNorm's all-reduced backward, rank r's
        # gradients are its share of d(sum over ranks of their losses)/dθ = WORLD * d(full-batch mean)/dθ; DDP
        # averages the shares, giving exactly the full-batch mean's gradients. With equal halves this is the
        # usual per-rank mean loss.
        out, calls = _step(DistributedDataParallel(model) if ddp else model, x[part], y[part], WORLD / full)
    if not ddp:
        for p in model.parameters():
            dist.all_reduce(p.grad)
            p.grad /= WORLD
    return {
        "tensors": [out, *_grads(model), *model.buffers()],
        "output": _rel([out], [ref_out[part]]),
        "grads": _rel(_grads(model), _grads(reference)),  # after DDP's averaging
        "buffers": _rel(_float_buffers(model), _float_buffers(reference)),  # running_mean, running_var
        "counts": (_counts(model), _counts(reference)),  # num_batches_tracked
        "calls": calls,
    }


def _sharded_against_full_batch(base: DenseNet, mode: str, x: Tensor, y: Tensor, rank: int, unit: str) -> dict:
    """One training step of the converted model, sliced and sharded by FSDP2's ``fully_shard`` per ``unit`` and then
    whole, on this rank's half, against the unconverted one on the full batch: FSDP2 averages the ranks' gradients,
    as DDP does, and gathers the parameters each shard's forward and backward read (backward's rerun included)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    reference = copy.deepcopy(base).train()
    model = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base).set_memory(mode).train())
    model.backward_slices = 2
    mesh = init_device_mesh("cpu", (WORLD,))
    if unit.endswith("checkpointed"):
        from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import apply_activation_checkpointing
        apply_activation_checkpointing(model, check_fn=lambda m: type(m).__name__ == "DenseLayer")
    try:
        for module in model.modules():
            if type(module).__name__ == unit.split(",")[0]:
                fully_shard(module, mesh=mesh)
    except ValueError as e:  # torch 2.11's fully_shard refuses any nn.ModuleDict (torchvision's blocks too); 2.14's not
        return {"refused": str(e).splitlines()[0]}
    fully_shard(model, mesh=mesh)
    ref_out, _ = _step(reference, x, y, 1 / x.size(0))
    part = slice(rank * BATCH, (rank + 1) * BATCH)
    out, _ = _step(model, x[part], y[part], 1 / BATCH)
    grads = [p.grad.full_tensor() for p in model.parameters()]
    return {
        "output": _rel([out], [ref_out[part]]),
        "grads": _rel(grads, _grads(reference)),
        "buffers": _rel(_float_buffers(model), _float_buffers(reference)),
    }


def _scenarios(rank: int) -> dict[str, dict]:
    from monai.data import MetaTensor

    torch.manual_seed(0)
    base = DenseNet(**TINY, memory="plain")
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():  # non-default running statistics, so every update shows
        for m in base.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=generator) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=generator) + 0.5)
                m.num_batches_tracked.fill_(7)
    x = torch.randn(WORLD * BATCH, 3, SIZE, SIZE, generator=generator)
    y = torch.randint(0, TINY["num_classes"], (WORLD * BATCH,), generator=generator)
    mine = slice(rank * BATCH, (rank + 1) * BATCH)
    results: dict[str, dict] = {}
    for mode in MEMORY_MODES:
        for variant in VARIANTS:
            results[f"{mode}/{variant}"] = _against_full_batch(base, mode, x, y, rank, variant)
        for unit in SHARDED_UNITS:
            results[f"{mode}/fsdp2 {unit}"] = _sharded_against_full_batch(base, mode, x, y, rank, unit)

        # The trainer's --sync-bn on the CPU under torchrun: DDP wraps first (it refuses SyncBatchNorm on the CPU),
        # then the norms are converted in place.
        after = copy.deepcopy(base).set_memory(mode).train()
        out, _ = _step(ddp_model(after, torch.device("cpu"), sync_bn=True), x[mine], y[mine], 1 / BATCH)
        results[f"{mode}/converted after wrapping"] = {"tensors": [out, *_grads(after), *after.buffers()]}

        # MONAI's pipelines hand MetaTensors, on which torch's SyncBatchNorm fails (pytorch/pytorch#86456): its
        # output, wrapped as a view, may not be changed in place by the ReLU after it.
        meta = copy.deepcopy(base).set_memory(mode).train()
        model = ddp_model(meta, torch.device("cpu"), sync_bn=True)
        out, _ = _step(model, MetaTensor(x[mine], meta={"filename_or_obj": "a.nii.gz"}), y[mine], 1 / BATCH)
        results[f"{mode}/MetaTensor"] = {"tensors": [out.as_subclass(Tensor), *_grads(meta), *meta.buffers()]}

        def fresh(converted: bool = False, train: bool = True, mode: str = mode) -> nn.Module:
            model = copy.deepcopy(base).set_memory(mode).train(train)
            return nn.SyncBatchNorm.convert_sync_batchnorm(model) if converted else model

        # Unconverted under DDP: per-rank statistics, as one process on this rank's half, not on the full batch.
        local, half, full = fresh(), fresh(), fresh()
        local_out, calls = _step(DistributedDataParallel(local), x[mine], y[mine], 1 / BATCH)
        half_out, _ = _step(half, x[mine], y[mine], 1 / BATCH)
        full_out, _ = _step(full, x, y, 1 / (WORLD * BATCH))
        results[f"{mode}/unconverted"] = {
            "output_vs_half": _rel([local_out], [half_out]),
            "buffers_vs_half": _rel(_float_buffers(local), _float_buffers(half)),
            "output_vs_full": _rel([local_out], [full_out[mine]]),
            "buffers_vs_full": _rel(_float_buffers(local), _float_buffers(full)),
            "calls": calls,
        }

        # Eval: a converted model normalises with running statistics and synchronises nothing.
        converted_eval, plain_eval = fresh(converted=True, train=False), fresh(train=False)
        eval_out, calls = _step(converted_eval, x[mine], y[mine], 1 / BATCH)
        plain_eval_out, _ = _step(plain_eval, x[mine], y[mine], 1 / BATCH)
        results[f"{mode}/eval"] = {
            "output": _rel([eval_out], [plain_eval_out]),
            "grads": _rel(_grads(converted_eval), _grads(plain_eval)),
            "buffers": _rel(_float_buffers(converted_eval), _float_buffers(base)),
            "calls": calls,
        }

        # Partly converted, against torchvision's DenseNet with reference synchronised norms in the same places.
        mixed = fresh()
        tv = torchvision.models.DenseNet(growth_rate=TINY["growth_rate"], block_config=TINY["block_config"],
                                         num_init_features=TINY["num_init_features"], num_classes=TINY["num_classes"])
        tv.load_state_dict(base.state_dict())
        for name in MIXED:
            _replace(mixed, name, nn.SyncBatchNorm.convert_sync_batchnorm(mixed.get_submodule(name)))
            _replace(tv, name, _reference_sync(tv.get_submodule(name)))
        mixed_out, _ = _step(DistributedDataParallel(mixed), x[mine], y[mine], 1 / BATCH)
        tv_out, _ = _step(DistributedDataParallel(tv.train()), x[mine], y[mine], 1 / BATCH)
        results[f"{mode}/mixed"] = {
            "output": _rel([mixed_out], [tv_out]),
            "grads": _rel(_grads(mixed), _grads(tv)),
            "buffers": _rel(_float_buffers(mixed), _float_buffers(tv)),
            "counts": (_counts(mixed), _counts(tv)),
        }
    return results


def _worker(rank: int, init_method: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    # DDP refuses SyncBatchNorm on CPU when wrapping, since torch's own SyncBatchNorm needs a GPU; effidense's does
    # not, so lift that guard (it checks nothing else) to train on CPU with the real DDP reducer.
    DistributedDataParallel._passing_sync_batchnorm_handle = lambda self, module: None
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=WORLD,
                            timeout=timedelta(seconds=60))  # mismatched collectives fail instead of hanging
    try:
        results = _scenarios(rank)
    finally:
        dist.destroy_process_group()
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    # Done: the interpreter's exit need not walk every object torch made (its collections take about a second).
    gc.collect()
    gc.freeze()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict[str, dict]]:
    out_dir = tmp_path_factory.mktemp("syncbn")
    mp.spawn(_worker, args=(f"tcp://127.0.0.1:{free_port()}", str(out_dir)), nprocs=WORLD, join=True)
    return [torch.load(out_dir / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_converted_ddp_equals_single_process_full_batch(ranks, mode, variant):
    tol = VARIANTS[variant][-1]
    for rank, results in enumerate(ranks):
        r = {k: v for k, v in results[f"{mode}/{variant}"].items() if k != "tensors"}
        assert r["output"] <= tol and r["grads"] <= tol and r["buffers"] <= tol, (rank, r)
        assert r["counts"][0] == r["counts"][1] == [8] * len(r["counts"][0]), (rank, r)  # 7 before the step


@pytest.mark.parametrize("unit", SHARDED_UNITS)
@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_fully_sharded_equals_single_process_full_batch(ranks, mode, unit):
    for rank, results in enumerate(ranks):
        r = results[f"{mode}/fsdp2 {unit}"]
        if "refused" in r:
            pytest.skip(f"this torch's fully_shard refuses a {unit}: {r['refused'][:80]}")
        assert r["output"] <= TOL and r["grads"] <= TOL and r["buffers"] <= TOL, (rank, r)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("mode", ["efficient", "frugal"])
def test_modes_stay_bitwise_equal_to_plain(ranks, mode, variant):
    for results in ranks:
        pairs = zip(results[f"{mode}/{variant}"]["tensors"], results[f"plain/{variant}"]["tensors"], strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize(("scenario", "same_as"), [("converted after wrapping", "even"),
                                                    ("MetaTensor", "converted after wrapping")],
                         ids=["converted after wrapping", "MetaTensor input"])
@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_the_same_step_bitwise(ranks, mode, scenario, same_as):
    """The trainer's --sync-bn on the CPU converts after DDP wraps the model, and MONAI hands MetaTensors: each is
    the same step as converting before wrapping, and as a plain tensor, bitwise."""
    for results in ranks:
        pairs = zip(results[f"{mode}/{scenario}"]["tensors"], results[f"{mode}/{same_as}"]["tensors"], strict=True)
        assert all(torch.equal(a, b) for a, b in pairs)


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_collectives_once_per_feature_map_and_norm_never_in_recomputation(ranks, mode):
    for variant in VARIANTS:
        assert [r[f"{mode}/{variant}"]["calls"] for r in ranks] == \
            [{"forward": FORWARD_COLLECTIVES, "backward": BACKWARD_COLLECTIVES}] * WORLD, variant


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_unconverted_ddp_keeps_per_rank_statistics(ranks, mode):
    for rank, results in enumerate(ranks):
        r = results[f"{mode}/unconverted"]
        assert r["output_vs_half"] <= TOL and r["buffers_vs_half"] <= TOL, (rank, r)
        # the difference synchronisation makes is real
        assert r["output_vs_full"] > 1e-2 and r["buffers_vs_full"] > 1e-3, (rank, r)
        assert r["calls"] == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_sync_batchnorm_in_eval_uses_running_statistics(ranks, mode):
    for rank, results in enumerate(ranks):
        r = results[f"{mode}/eval"]
        assert r["output"] == 0 and r["grads"] == 0 and r["buffers"] == 0, (rank, r)
        assert r["calls"] == {"forward": 0, "backward": 0}


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_partly_converted_equals_reference_sync_norms(ranks, mode):
    """Norms of one block that disagree on synchronisation each get their own kind of statistics."""
    for rank, results in enumerate(ranks):
        r = results[f"{mode}/mixed"]
        assert r["output"] <= TOL and r["grads"] <= TOL and r["buffers"] <= TOL, (rank, r)
        assert r["counts"][0] == r["counts"][1], (rank, r)


@pytest.mark.parametrize("mode", MEMORY_MODES)
def test_converted_without_process_group_is_the_unconverted_model(mode):
    """No torch.distributed: SyncBatchNorm falls back to local statistics, bitwise as BatchNorm2d."""
    assert not dist.is_initialized()
    base = DenseNet(**TINY, memory=mode).train()
    converted = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(base))
    x, y = torch.randn(2, 3, SIZE, SIZE), torch.tensor([0, 3])
    outs = [_step(m, x, y, 0.5)[0] for m in (base, converted)]
    assert torch.equal(outs[0], outs[1])
    for a, b in zip(_grads(base) + list(base.buffers()), _grads(converted) + list(converted.buffers()), strict=True):
        assert torch.equal(a, b)
