"""Segments, and the one light autograd Function they rerun in.

A concatenation-norm-activation-convolution (:func:`concat_norm_conv`), a stem's convolution-norm-activation-pool
(:func:`conv_norm_pool`) or a frugal dense layer (:func:`light_segment`) keeps only its input for backward. Native
training-mode BatchNorm with ReLU, where no module has hooks, reruns in :class:`LightSegment`: forward calls the
modules once, keeps only the input maps, and backward rebuilds BatchNorm and ReLU and calls the very kernels autograd
calls for the plain model (or goes through the batch in slices), dropping each map when done. Any other norm or
activation, and a hooked module (a hook may change what it computes, as pruning's does), is checkpointed
(:func:`~.recompute.checkpointed`). Under ``create_graph=True`` the Function differentiates a rerun
instead (:func:`~.recompute.differentiable_rerun`), so double backward works.
"""
from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import torch
from torch import Tensor, nn
from torch._subclasses.fake_tensor import FakeTensor

from .gather import GradSlot, slots_of, with_slot
from .masks import random_state, replayed
from .norm import Affine, BatchNormAct, affine, grad_sums, input_grad, normalize_maps, normalized
from .pool import MaxPool
from .recompute import checkpointed, differentiable_rerun, hooked

__all__ = ["LightSegment", "PooledConv", "as_conv_sees", "autocast_state", "cat_maps",
           "concat_norm_conv", "concat_norm_conv_pool", "conv_norm_pool",
           "light_segment", "plain_conv", "runs_light", "saved_only", "slice_count", "torch_conv"]

SLICE_FLOOR = 32 * 2 ** 20  # bytes: a smaller rerun costs little memory, and slicing it would cost kernel launches
APART_FLOOR = SLICE_FLOOR  # bytes a map: a slice's concatenation of smaller maps is made in backward, not avoided


def runs_light(norm: nn.Module, act: nn.Module, conv: nn.Module) -> bool:
    """Whether ``norm``, ``act`` and ``conv`` can rerun in a light Function: native training-mode BatchNorm, ReLU, a
    convolution differentiated by hand (or a max-pool), none with hooks (a hook may change what its module computes,
    as pruning's does, which a backward that calls kernels would not see). Asked where autograd records and nobody
    traces (the caller's ``run_mode``)."""
    pooled = isinstance(conv, PooledConv)
    return isinstance(norm, BatchNormAct) and norm.act is None and type(act) is nn.ReLU and \
        (plain_conv(conv) or isinstance(conv, MaxPool) or pooled and plain_conv(conv.conv)) \
        and not hooked(norm, act, *((conv.conv, conv.pool) if pooled else (conv,))) and norm.native_training()


def slice_count(setting: int | str | None, frugal: bool, batch: int, transient: float, reads: float,
                keeps: float | None = None) -> int:
    """How many slices of the batch a rerun's backward goes through: ``setting`` (a count, at most the batch), or for
    'auto', where the rerun would hold more than :data:`SLICE_FLOOR` (``transient`` bytes for the whole batch) and
    more than the mode keeps beside it (``keeps`` bytes; None: frugal's reruns only), as many as keep a slice's maps
    within half of what the rerun reads (``reads``), which is kept anyway. Once a rerun is sliced, more slices cost
    no arithmetic, only kernel launches (and host time)."""
    if setting == "auto":
        wanted = frugal if keeps is None else transient > keeps
        setting = math.ceil(2 * transient / reads) if wanted and transient > SLICE_FLOOR and reads else 1
    return 1 if setting is None else max(1, min(setting, batch))


def light_segment(stages: Sequence[tuple[nn.Module, nn.Module, nn.Module]], *maps: Tensor, slices: int = 1,
                  pre: nn.Module | None = None, dropout: Callable[[Tensor], Tensor] | None = None,
                  gather: bool = False, frees: int = 0) -> Tensor | None:
    """``stages`` (norm, ReLU, then a convolution or max-pool) in turn on the concatenated ``maps``, or on ``pre`` (a
    convolution) of the one map, then ``dropout``, in :class:`LightSegment`, whose backward goes through ``slices`` of
    the batch and draws the dropout's mask again; None where the modules cannot rerun light (the caller then
    checkpoints: :func:`runs_light`; its caller has found autograd recording and nobody tracing: ``run_mode``). Under
    ``torch.compile``, which cannot trace reading the random state, the dropout follows the segment and its mask is
    kept. ``gather``: a sliced segment's output gets a :class:`GradSlot`, where its readers gather its gradient.
    ``frees``: a sliced segment empties its last ``frees`` maps once it has normalised them (they are then read by
    nothing else, and a rerun rebuilds them: :func:`saved_only`)."""
    if not (torch.is_grad_enabled() and all(runs_light(*stage) for stage in stages)) or \
            (pre is not None and (not plain_conv(pre) or hooked(pre))) or maps[0].numel() == 0 or maps[0].is_meta:
        # nor an empty batch (BatchNorm's backward kernel fails on one, where autograd never calls it) or a meta one
        return None
    params = _segment_params(stages, pre)
    slots = slots_of(maps)
    if dropout is not None and torch.compiler.is_compiling():
        return dropout(LightSegment.apply(slices, (pre, tuple(stages), None, slots, None, 0), params, *params, *maps))
    slot = GradSlot() if gather and slices > 1 and not torch.compiler.is_compiling() else None
    out = LightSegment.apply(slices, (pre, tuple(stages), dropout, slots, slot, frees), params, *params, *maps)
    return out if slot is None else with_slot(out, slot)


def concat_norm_conv(norm: nn.Module, act: nn.Module, conv: nn.Module, *maps: Tensor, light: bool,
                     slices: int = 1, dropout: Callable[[Tensor], Tensor] | None = None) -> Tensor:
    """``dropout(conv(act(norm(*maps))))`` (no dropout when None); when ``light``, keeping only ``maps`` for backward,
    which goes through ``slices`` and draws the dropout's mask again rather than keeping it."""
    out = light_segment([(norm, act, conv)], *maps, slices=slices, dropout=dropout) if light else None
    if out is not None:
        return out
    out = checkpointed(light, lambda *t: conv(act(normalize_maps(norm, *t))), *maps)
    return out if dropout is None else dropout(out)


class PooledConv:
    """A convolution, then an average pool (a transition's), as one stage's post in a sliced segment: its backward
    then pools a slice's gradient back, never the whole batch's. Not a module: it calls the two modules. A subclass
    may pool otherwise (``pool``: any function of the convolution's output) and go back through it in
    :meth:`input_grad`."""

    kept: Sequence[Tensor] = ()  # what a subclass's pool keeps for backward: its segment saves it

    def __init__(self, conv: nn.Module, pool: Callable[[Tensor], Tensor]) -> None:
        self.conv, self.pool = conv, pool

    @functools.cached_property
    def weight(self) -> Tensor:
        """The convolution's weight as its segment's forward read it (once: a parametrised weight is made on each
        read), which backward uses too, whatever the module holds by then (``torch.func.functional_call``'s weights
        are gone once the call returns)."""
        return self.conv.weight

    def __call__(self, x: Tensor) -> Tensor:
        return self.pool(self.conv(x))

    def input_grad(self, ctx: Any, y: Tensor, grad: Tensor, part: tuple[int, int] | None) -> Tensor:
        """The gradient of the convolution's output, laid out as ``y`` (its input) is, given the pool's output's, for
        the samples ``part`` of the batch (None: all of them); ``ctx``: its segment's (its autocast state)."""
        like = torch.empty_permuted((y.shape[0], self.conv.out_channels, *y.shape[2:]), y.dim_order(),
                                    dtype=grad.dtype, device=grad.device)  # never read: shape and strides only
        return self.pool.input_grad(like, grad)


def concat_norm_conv_pool(norm: nn.Module, act: nn.Module, conv: nn.Module, pool: nn.Module, *maps: Tensor,
                          light: bool, slices: int = 1, frees: int = 0) -> Tensor:
    """``pool(conv(act(norm(*maps))))``, a transition, with the pool keeping nothing for backward; when ``light``,
    keeping only ``maps``, and when also sliced, pooling back a slice's gradient at a time (and emptying the last
    ``frees`` maps once normalised: :func:`light_segment`)."""
    out = light_segment([(norm, act, PooledConv(conv, pool))], *maps, slices=slices, frees=frees) \
        if light and slices > 1 else None
    return out if out is not None else pool(concat_norm_conv(norm, act, conv, *maps, light=light, slices=slices))


def conv_norm_pool(conv: nn.Module, norm: nn.Module, act: nn.Module, pool: nn.Module, x: Tensor,
                   slices: int = 1) -> Tensor:
    """``pool(act(norm(conv(x))))``, keeping only ``x`` for backward, which goes through ``slices``."""
    out = light_segment([(norm, act, pool)], x, slices=slices, pre=conv) if isinstance(pool, MaxPool) else None
    return out if out is not None else checkpointed(True, lambda t: pool(act(norm(conv(t)))), x)


def _run(pre: nn.Module | None, stages: Sequence[tuple[nn.Module, ...]], params: list, *maps: Tensor) -> Tensor:
    """The segment as the plain model runs it, its convolutions by the weights forward was given (``params``): a
    weight made on each read (a parametrisation's, as spectral norm's power iteration) is made once a run."""
    x, weight = (pre._conv_forward(maps[0], params[0], None), 3) if pre is not None else (maps, 2)
    for norm, act, post in stages:  # each stage's convolution weight, after its norm's weight and bias
        x = _post(post, act(norm(*x) if isinstance(x, tuple) else norm(x)), params[weight])
        weight += 3
    return x


def _post(post: Any, y: Tensor, weight: Tensor | None) -> Tensor:
    """A stage's convolution of its normalised map ``y`` by ``weight`` (then a :class:`PooledConv`'s pool), or its
    max-pool, as the module computes it."""
    if isinstance(post, PooledConv):
        y, post = post.conv._conv_forward(y, weight, None), post.pool
    return post._conv_forward(y, weight, None) if isinstance(post, nn.modules.conv._ConvNd) else post(y)


class LightSegment(torch.autograd.Function):
    """One or two stages (BatchNorm, ReLU, then a convolution or max-pool) in turn on the concatenated maps, or on
    ``pre`` (a convolution) of the one map, keeping only the maps for backward (and each norm's batch statistics,
    two values per channel, when sliced). Forward runs the modules as the plain model does, or, sliced, BatchNorm by
    the very kernel ``F.batch_norm`` calls: outputs and running statistics are bitwise the plain model's.

    Backward rebuilds the segment's maps and calls the kernels autograd calls for the plain model
    (``convolution_backward``, the pool's, ReLU's ``threshold_backward``, whichever BatchNorm ran, the
    concatenation's), dropping each map when done: gradients are bitwise the plain model's, with fewer maps alive at
    once than a checkpoint's rerun. Under ``create_graph=True`` it differentiates a rerun instead.

    **Sliced** (``slices`` > 1), it goes through the batch a slice at a time, rebuilding each slice from the saved
    statistics, so it holds a slice's maps rather than the batch's; forward and backward normalise the maps apart
    (:func:`_batch_norm_apart`), never making their concatenation. A BatchNorm couples the samples through two
    per-channel sums of its gradients, so each norm takes a sweep to sum them before an input gradient can be formed:
    with two stages the first sweep sums the second norm's, keeping its output's gradient (the bottleneck's width),
    and the next forms its input's gradient; then one sums the first norm's; the last forms each slice's input
    gradient. Weight gradients are summed slice by slice: gradients equal the plain model's up to the order of
    floating-point sums."""

    @staticmethod
    def forward(ctx: Any, slices: int, modules: tuple, params: list, *tensors: Tensor) -> Tensor:
        (pre, stages, dropout, ctx.slots, ctx.slot, frees), maps = modules, tensors[len(params):]
        ctx.modules, ctx.slices, ctx.stats = (pre, stages, params), slices, []
        ctx.set_materialize_grads(False)  # a gradient gathered in a slot comes with none from autograd
        ctx.autocast = autocast_state(maps[0])
        if slices == 1:
            x = _run(pre, stages, params, *maps)
        else:
            x = [pre._conv_forward(maps[0], params[0], None)] if pre is not None else maps
            for (norm, act, post), (_, _, weight) in zip(stages, _stage_weights(pre, params), strict=True):
                # F.batch_norm's very kernel, with its statistics
                y, mean, invstd = _batch_norm_apart(norm, x)
                ctx.stats.append((mean, invstd))
                del x  # neither is held beside the next map
                for t in maps[len(maps) - frees:] if frees else ():
                    if t._base is None:  # a view (MONAI's MetaTensor is one) holds its base: emptying it frees nothing
                        t.set_()
                y = act(y)
                if isinstance(post, PooledConv):  # nor the normalised map beside the pooled one
                    y, post, weight = post.conv._conv_forward(y, weight, None), post.pool, None
                x = [_post(post, y, weight)]
                del y
            x = x[0]
        # What a pooled stage keeps beside the maps (a dropout's mask) is saved with them, so saved-tensor hooks see
        # it; so are the weights, as the plain model's kernels save them: one changed in place before backward fails
        # there as in plain, rather than differentiate what forward did not compute.
        pooled = stages[-1][2] if isinstance(stages[-1][2], PooledConv) else None
        ctx.save_for_backward(*maps, *params, *(pooled.kept if pooled is not None else ()))
        ctx.maps = len(maps)
        if pooled is not None:
            pooled.kept = ()
        ctx.dropout = None
        if dropout is not None:  # its mask is drawn again in backward, from the random state it was drawn from
            ctx.dropout = dropout, random_state(x.device), (x.shape, x.stride(), x.dtype, x.device)
            x = dropout(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: Tensor | None) -> tuple[Tensor | None, ...]:
        (pre, stages, params), saved = ctx.modules, ctx.saved_tensors
        count = ctx.maps + len(params)
        maps, kept = saved[:ctx.maps], saved[count:]
        ctx.modules = pre, stages, list(saved[ctx.maps:count])
        if kept:  # handed back to the pooled stage for this backward only
            stages[-1][2].kept = kept
        try:
            return LightSegment._backward(ctx, grad, maps)
        finally:
            if kept:
                stages[-1][2].kept = ()

    @staticmethod
    def _backward(ctx: Any, grad: Tensor | None, maps: Sequence[Tensor]) -> tuple[Tensor | None, ...]:
        pre, stages, params = ctx.modules
        if ctx.slot is not None:
            grad = ctx.slot.take(grad)
        if grad is None:
            return (None,) * (3 + len(params) + len(maps))
        if ctx.dropout is not None:
            grad = replayed(*ctx.dropout).mul_(grad)
        if torch.is_grad_enabled():
            rerun_ = functools.partial(_run, pre, stages, params)
            # the norms as forward ran them: with these weights and batch statistics (a model may be in eval mode now)
            norms = [(norm, name, t) for (norm, _, _), weights in zip(stages, _stage_weights(pre, params), strict=True)
                     for name, t in zip(("weight", "bias", "training"), (*weights[:2], True), strict=True)
                     if t is not None]
            return differentiable_rerun(ctx, grad, rerun_, (None,) * 3 + tuple(params), maps, used=norms)
        needs = ctx.needs_input_grad
        grads = {id(w): None for w, need in zip(params, needs[3:], strict=False) if w is not None and need}
        need_maps = needs[3 + len(params):]
        grad_maps = LightSegment.sliced(ctx, maps, grad, grads, need_maps) if ctx.slices > 1 else \
            LightSegment.whole(ctx, maps, grad, grads, need_maps)
        for i, slot in enumerate(ctx.slots if any(ctx.slots) else ()):  # gathered where the map's maker takes it
            if slot is not None and grad_maps[i] is not None:
                if grad_maps[i] is not slot.held():
                    slot.add(grad_maps[i])
                grad_maps[i] = None
        return None, None, None, *[None if w is None else grads.get(id(w)) for w in params], *grad_maps

    @staticmethod
    def whole(ctx: Any, maps: Sequence[Tensor], grad: Tensor, grads: dict,
              need_maps: Sequence[bool]) -> list[Tensor | None]:
        """The whole batch at once, by autograd's own kernels."""
        pre, stages, params = ctx.modules
        weights = _stage_weights(pre, params)
        x = _conv(ctx, pre, maps[0], params[0]) if pre is not None else cat_maps(maps)
        inputs, outs, saved = [], [], []
        for j, (norm, _, post) in enumerate(stages):
            y, bn_saved = _batch_norm_relu(norm, x, *weights[j][:2])
            inputs.append(x)
            outs.append(y)
            saved.append(bn_saved)
            if j < len(stages) - 1:
                x = _conv(ctx, post, y, weights[j][2])
        del x
        for j in reversed(range(len(stages))):
            (norm, _, post), (weight, bias, post_weight) = stages[j], weights[j]
            y = outs.pop()
            grad = _relu_backward(_post_backward(ctx, post, grad, y, grads, post_weight), y)
            del y
            mask = [j > 0 or pre is not None or any(need_maps), id(weight) in grads, id(bias) in grads]
            grad, grad_w, grad_b = _batch_norm_backward(norm, inputs.pop(), grad, saved.pop(), mask, weight)
            grads.update({id(p): g for p, g in ((weight, grad_w), (bias, grad_b)) if id(p) in grads})
        if pre is not None:
            grad, grad_w = _conv_backward(ctx, pre, grad, maps[0], need_maps[0], id(params[0]) in grads, params[0])
            _accumulate(grads, params[0], grad_w)
            return [None if grad is None else grad.to(maps[0].dtype)]
        if grad is None:
            return [None] * len(maps)
        return [g if need else None for g, need in zip(grad.split_with_sizes([t.shape[1] for t in maps], 1),
                                                       need_maps, strict=True)]

    @staticmethod
    def sliced(ctx: Any, maps: Sequence[Tensor], grad: Tensor, grads: dict,
               need_maps: Sequence[bool]) -> list[Tensor | None]:
        """A slice of the batch at a time, in sweeps (the class docstring)."""
        pre, stages, params = ctx.modules
        weights = _stage_weights(pre, params)
        parts, batch = _bounds(grad.shape[0], ctx.slices), grad.shape[0]
        if isinstance(grad, FakeTensor) and len(parts) > 3:
            # No values to compute, only allocations: the first slice, the second (held beside the first's leftovers,
            # as every slice after it is) and the last (the smallest, whose leftovers the next sweep starts beside)
            # allocate as all of them do.
            parts = [*parts[:2], parts[-1]]

        sliced_maps = {(a, b): [t[a:b] for t in maps] for a, b in parts}  # views, made once for every sweep
        norms = [affine(*stats, *weight[:2], maps[0].dim()) for stats, weight in zip(ctx.stats, weights, strict=True)]

        # The first norm reads the maps apart where forward's did, so a slice's concatenation is never made, where its
        # maps are large enough to be worth the kernels they take apart (several a map, for every slice and sweep).
        size = sum(t.element_size() * t[parts[0][0]:parts[0][1]].numel() for t in maps)
        apart = _apart(maps) if pre is None and size > len(maps) * APART_FLOOR else None
        channels = apart.channels if apart is not None else [slice(None)]
        firsts = [norms[0].channels(part) for part in channels]

        def front(a: int, b: int) -> tuple[list[Tensor], Tensor]:  # a slice's segment input and first normalised map
            if apart is None:
                x = _conv(ctx, pre, sliced_maps[a, b][0], params[0]) if pre is not None else \
                    torch.cat(sliced_maps[a, b], 1)
                return [x], normalized(x, norms[0]).relu_()
            xs = sliced_maps[a, b]
            y = apart.output(xs[0])
            for x, part, first in zip(xs, channels, firsts, strict=True):
                y[:, part] = normalized(x, first)
            return xs, y.relu_()

        def summed(gz: Tensor, xs: list[Tensor], stats: list[Affine], total: list) -> None:  # a norm's two sums
            parts = [grad_sums(gz[:, part], x, a) for x, part, a in
                     zip(xs, channels if len(xs) > 1 else [slice(None)], stats, strict=True)]
            sums = [torch.cat(s) for s in zip(*parts, strict=True)] if len(parts) > 1 else parts[0]
            total[:] = sums if not total else [t + s for t, s in zip(total, sums, strict=True)]

        def through(j: int, g: Tensor, y: Tensor, weight: bool, part: tuple[int, int]) -> Tensor:  # post, then ReLU
            return _relu_backward(_post_backward(ctx, stages[j][2], g, y, grads if weight else {}, weights[j][2], part),
                                  y)

        # where a map's gradient is gathered, this segment's adds to what is there; else it is made here
        held = [None if slot is None or not need else slot.held() for slot, need in zip(ctx.slots, need_maps,
                                                                                         strict=True)]
        grad_maps = [h if h is not None else torch.empty_like(t) if need else None
                     for t, need, h in zip(maps, need_maps, held, strict=True)]
        for slot, g, h in zip(ctx.slots, grad_maps, held, strict=True):
            if slot is not None and g is not None and h is None:
                slot.hold(g)
        sliced_grads = {(a, b): [None if t is None or h is not None else t[a:b] for t, h in
                                 zip(grad_maps, held, strict=True)] for a, b in parts}  # filled by this segment
        sliced_sums = {(a, b): [None if h is None else h[a:b] for h in held] for a, b in parts}  # added to
        tops, totals = [grad[a:b] for a, b in parts], [[] for _ in stages]
        if len(stages) == 2:  # the second norm's sums, keeping its output's gradient; then its input's gradient
            for i, (a, b) in enumerate(parts):
                x1 = _conv(ctx, stages[0][2], front(a, b)[1], weights[0][2])
                gz1 = through(1, tops[i], normalized(x1, norms[1]).relu_(), True, (a, b))
                summed(gz1, [x1], [norms[1]], totals[1])
                tops[i] = gz1
                del x1, gz1  # each sweep drops a slice's maps before the next slice's are made
            for i, (a, b) in enumerate(parts):  # its input rebuilt rather than kept
                x1 = _conv(ctx, stages[0][2], front(a, b)[1], weights[0][2])
                count = batch * math.prod(x1.shape[2:])
                tops[i] = input_grad(tops[i], x1, norms[1], *totals[1], count)
                del x1
        for (a, b), top in zip(parts, tops, strict=True):  # the first norm's sums
            xs, y = front(a, b)
            count = batch * math.prod(xs[0].shape[2:])
            g = through(0, top, y, True, (a, b))
            del y
            summed(g, xs, firsts, totals[0])
            del xs, g
        for i, (a, b) in enumerate(parts):  # each slice's input gradient
            xs, y = front(a, b)
            g = through(0, tops[i], y, False, (a, b))
            tops[i] = None
            del y
            parts_of_g = [input_grad(g[:, part], x, first, *(t[part] for t in totals[0]), count)
                          for x, part, first in zip(xs, channels, firsts, strict=True)]
            del xs, g
            if pre is not None:
                g, grad_w = _conv_backward(ctx, pre, parts_of_g[0], sliced_maps[a, b][0], need_maps[0],
                                           id(params[0]) in grads, params[0])
                _accumulate(grads, params[0], grad_w)
                parts_of_g = [g]
                del g
            elif apart is None:
                parts_of_g = parts_of_g[0].split([t.shape[1] for t in maps], 1)
            for targets, write in ((sliced_grads[a, b], torch._foreach_copy_),
                                   (sliced_sums[a, b], torch._foreach_add_)):
                pairs = [(t, part) for t, part in zip(targets, parts_of_g, strict=True) if t is not None]
                if pairs:  # one op for every map
                    write([t for t, _ in pairs], [part for _, part in pairs])
            del parts_of_g, pairs
        for (weight, bias, _), (total_dy, total_dy_xhat) in zip(weights, totals, strict=True):
            for param, total in ((weight, total_dy_xhat), (bias, total_dy)):
                if param is not None and id(param) in grads:
                    grads[id(param)] = total.to(param.dtype)
        return grad_maps


class _SavedOnly(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, *tensors: Tensor) -> Tensor:
        ctx.save_for_backward(*tensors)
        return torch.empty(0, dtype=tensors[0].dtype, device=tensors[0].device)  # a plain tensor, whatever the maps

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[None, ...]:
        raise RuntimeError("a rerun's stand-in is never differentiated")


def saved_only(maps: Sequence[Tensor], stages: Sequence[tuple[nn.Module, nn.Module, Any]]) -> Tensor:
    """In the rerun of a checkpoint whose last segment, of ``stages``, read ``maps``, that segment's stand-in: it saves
    ``maps`` and the stages' weights, as the segment saved them, and computes nothing (a rerun's output is never
    read), so rebuilding what the segment's backward reads never holds what its forward held. Taking the weights, it
    saves wherever autograd recorded the segment: for trained weights on maps that need no gradient (a frozen block)."""
    return _SavedOnly.apply(*maps, *_segment_params(stages))


def _segment_params(stages: Sequence[tuple[nn.Module, nn.Module, Any]], pre: nn.Module | None = None) -> list:
    """The weights of a segment's ``stages`` (after ``pre``), in the order its light Function takes and saves them."""
    params = [] if pre is None else [pre.weight]
    for norm, _, post in stages:
        params += [norm.weight, norm.bias, getattr(post, "weight", None)]
    return params


def _accumulate(grads: dict, weight: Tensor, grad: Tensor | None) -> None:
    if grad is not None:
        grads[id(weight)] = grad if grads[id(weight)] is None else grads[id(weight)].add_(grad)


def _stage_weights(pre: nn.Module | None, params: list) -> list[list]:
    """Each stage's norm weight, norm bias and convolution weight, as forward was given them (``params``)."""
    params = params[pre is not None:]
    return [params[i:i + 3] for i in range(0, len(params), 3)]


def cat_maps(maps: Sequence[Tensor]) -> Tensor:
    """One map, or the maps' concatenation along the channels."""
    return maps[0] if len(maps) == 1 else torch.cat(maps, 1)


def autocast_state(t: Tensor) -> tuple[bool, torch.dtype]:
    """Forward's autocast state on ``t``'s device, which backward's kernels are run as."""
    device = t.device.type
    return torch.is_autocast_enabled(device), torch.get_autocast_dtype(device)


def as_conv_sees(ctx: Any, t: Tensor) -> Tensor:
    """``t`` as a convolution saw it under forward's autocast state (``ctx.autocast``): in autocast's dtype if on."""
    enabled, dtype = ctx.autocast
    return t.to(dtype) if enabled and t.is_floating_point() and t.dtype != dtype else t


def _conv(ctx: Any, conv: nn.Module, x: Tensor, weight: Tensor) -> Tensor:
    """A convolution as forward ran it (under its autocast state), by its kernel."""
    with torch.autocast(x.device.type, dtype=ctx.autocast[1], enabled=ctx.autocast[0]):
        return conv._conv_forward(x, weight, None)


def _post_backward(ctx: Any, post: nn.Module, grad: Tensor, y: Tensor, grads: dict, weight: Tensor | None,
                   part: tuple[int, int] | None = None) -> Tensor:
    """The gradient of a stage's normalised map ``y`` (the samples ``part`` of the batch; None: all) through its
    convolution (its weight's summed into ``grads`` where wanted) or max-pool, in ``y``'s dtype."""
    if isinstance(post, MaxPool):
        grad = post.input_grad(y, grad)
    else:
        if isinstance(post, PooledConv):  # the pool may have run in float32 (CPU autocast's avg_pool3d), not the conv
            grad, post = as_conv_sees(ctx, post.input_grad(ctx, y, grad, part)), post.conv
        grad, grad_w = _conv_backward(ctx, post, grad, y, True, id(weight) in grads, weight)
        _accumulate(grads, weight, grad_w)
    return grad if grad.dtype == y.dtype else grad.to(y.dtype)


def _batch_norm_apart(norm: nn.Module, maps: Sequence[Tensor]) -> tuple[Tensor, Tensor, Tensor]:
    """Training-mode BatchNorm of the maps' concatenation, by the kernel ``F.batch_norm`` calls, and its batch
    statistics, with the running statistics the norm's own forward would update (:meth:`BatchNormAct.running_buffers`:
    none on a rerun). Where the maps are laid out alike (:func:`_apart`), the kernel runs on each map's channels in
    turn, writing into one output: per channel the very statistics and values of the whole, but the concatenation is
    never held beside the output."""
    running_mean, running_var, factor = norm.running_buffers()
    apart = _apart(maps)
    if apart is None:
        y, mean, invstd, _, _ = torch._batch_norm_impl_index(
            cat_maps(maps), norm.weight, norm.bias, running_mean, running_var, True, factor, norm.eps,
            torch.backends.cudnn.enabled)
        return y, mean, invstd
    y, stats = None, [None] * len(maps)
    # a map not laid out as in the concatenation (a crop) is copied so first, before the output is made
    for i in sorted(range(len(maps)), key=lambda i: maps[i].is_contiguous(memory_format=apart.layout)):
        part = apart.channels[i]
        weight, bias, mean, var = (None if p is None else p[part] for p in (
            norm.weight, norm.bias, running_mean, running_var))
        x = maps[i].to(apart.dtype).contiguous(memory_format=apart.layout)
        out, *stats[i], _, _ = torch._batch_norm_impl_index(x, weight, bias, mean, var, True, factor, norm.eps,
                                                            torch.backends.cudnn.enabled)
        del x
        if y is None:
            y = apart.output(out)
        y[:, part] = out
        del out
    return y, *(torch.cat(s) for s in zip(*stats, strict=True))


class _Apart(NamedTuple):
    """How maps read apart lie in their concatenation: its memory format and dtype, and each map's channels."""

    layout: torch.memory_format
    dtype: torch.dtype
    channels: list[slice]

    def output(self, like: Tensor) -> Tensor:
        """An empty map of the concatenation's channels, layout and dtype, with ``like``'s batch and positions."""
        return torch.empty((like.shape[0], self.channels[-1].stop, *like.shape[2:]), dtype=self.dtype,
                           device=like.device, memory_format=self.layout)


def _apart(maps: Sequence[Tensor]) -> _Apart | None:
    """Where more than one map is laid out alike beyond doubt (:func:`_layout`), how they lie in their concatenation;
    None otherwise (they are concatenated)."""
    layout = _layout(maps[0])
    if len(maps) == 1 or layout is None or any(_layout(t) != layout for t in maps):
        return None
    ends = itertools.accumulate(t.shape[1] for t in maps)
    return _Apart(layout, functools.reduce(torch.promote_types, [t.dtype for t in maps]),
                  [slice(end - t.shape[1], end) for t, end in zip(maps, ends, strict=True)])


def _layout(t: Tensor) -> torch.memory_format | None:
    """The memory format a concatenation of maps like ``t`` takes, by the order of its strides (a crop's too), where
    that is beyond doubt: not for a map of one channel or position, where it hangs on strides that do not matter."""
    if t.shape[1] == 1 or math.prod(t.shape[2:]) == 1:
        return None
    order = tuple(t.dim_order())
    if order == tuple(range(t.dim())):
        return torch.contiguous_format
    channels_last = {4: torch.channels_last, 5: torch.channels_last_3d}.get(t.dim())
    return channels_last if channels_last is not None and order == (0, *range(2, t.dim()), 1) else None


def _batch_norm_relu(norm: nn.Module, x: Tensor, weight: Tensor | None,
                     bias: Tensor | None) -> tuple[Tensor, tuple[Any, ...]]:
    """``ReLU(BN(x))`` with batch statistics and no running statistics, by the kernel ``F.batch_norm`` picks (native or
    cuDNN), and what its backward needs."""
    y, save_mean, save_invstd, reserve, impl = torch._batch_norm_impl_index(
        x, weight, bias, None, None, True, 0.0, norm.eps, torch.backends.cudnn.enabled)
    return y.relu_(), (save_mean, save_invstd, reserve, impl)


def _batch_norm_backward(norm: nn.Module, x: Tensor, grad_y: Tensor, saved: tuple[Any, ...], mask: list[bool],
                         weight: Tensor | None) -> tuple[Tensor | None, ...]:
    save_mean, save_invstd, reserve, impl = saved
    if impl == 0:  # native: the kernel the dispatcher below calls, which compiles with symbolic sizes (it does not)
        return torch.ops.aten.native_batch_norm_backward(
            grad_y, x, weight, None, None, save_mean, save_invstd, True, norm.eps, mask)
    return torch.ops.aten._batch_norm_impl_index_backward(
        impl, x, grad_y, weight, None, None, save_mean, save_invstd, True, norm.eps, mask, reserve)


def _relu_backward(grad: Tensor, y: Tensor) -> Tensor:
    """ReLU's backward, written into ``grad`` (the backward's own buffer) where the strides agree, so the layout is
    autograd's; otherwise (1x1 maps under channels_last) made anew, as autograd makes it, so BatchNorm's backward
    sees the same layout and gives the same bits."""
    if grad.stride() != y.stride():
        return torch.ops.aten.threshold_backward(grad, y, 0)
    return torch.ops.aten.threshold_backward.grad_input(grad, y, 0, grad_input=grad)


def _conv_backward(ctx: Any, conv: nn.Module, grad: Tensor, x: Tensor, need_x: bool, need_weight: bool,
                   weight: Tensor) -> tuple[Tensor | None, Tensor | None]:
    """``convolution_backward`` as autograd runs it under forward's autocast state: on the inputs autocast gave the
    convolution, with the weight's gradient in the weight's dtype."""
    seen = (as_conv_sees(ctx, x), as_conv_sees(ctx, weight)) if ctx.autocast[0] else (x, weight)
    grad_x, grad_weight, _ = torch.ops.aten.convolution_backward(
        grad, *seen, None, list(conv.stride), list(conv.padding),
        list(conv.dilation), False, [0] * len(conv.stride), conv.groups, [need_x, need_weight, False])
    return grad_x, grad_weight if grad_weight is None or grad_weight.dtype == weight.dtype else \
        grad_weight.to(weight.dtype)


_TORCH_CONV = {f for c in (nn.Conv1d, nn.Conv2d, nn.Conv3d) for f in (c.forward, c._conv_forward)}


def torch_conv(conv: nn.Module) -> bool:
    """torch's own convolution, computing ``_conv_forward(x, weight, bias)`` (a subclass with a forward of its own,
    as quantisation-aware training's, computes otherwise)."""
    return isinstance(conv, nn.modules.conv._ConvNd) and type(conv).forward in _TORCH_CONV and \
        type(conv)._conv_forward in _TORCH_CONV


def plain_conv(conv: nn.Module) -> bool:
    """A convolution differentiated by hand here: torch's own, no bias, zero padding given in numbers."""
    return torch_conv(conv) and not conv.transposed and conv.bias is None and conv.padding_mode == "zeros" and \
        isinstance(conv.padding, tuple)


def _bounds(batch: int, slices: int) -> list[tuple[int, int]]:
    """``slices`` consecutive parts of the batch, as equal as can be (as ``tensor_split``)."""
    size, extra = divmod(batch, min(slices, batch))
    starts = [i * size + min(i, extra) for i in range(min(slices, batch) + 1)]
    return list(zip(starts, starts[1:], strict=False))
