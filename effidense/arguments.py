"""The arguments a DenseNet takes, checked before anything is built: the memory mode's spellings (the one place a
mode is chosen), compilation, spatial dims and the configuration's bounds. Each failure is one ``ValueError``
line that names the argument."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["MAX_LAYERS", "MAX_PARAMETERS", "MEMORY_MODES", "SPATIAL_DIMS", "check_block", "check_compile",
           "check_config", "check_input", "check_layer", "check_spatial_dims", "check_transition", "count_weights",
           "map_size", "min_input_size", "resolve_memory"]

MEMORY_MODES = ("plain", "efficient", "frugal")
SPATIAL_DIMS = (1, 2, 3)
MAX_LAYERS = 10_000  # DenseNet-264 has 130 dense layers; far more only exhausts memory while building


def check_spatial_dims(spatial_dims: Any) -> None:
    if isinstance(spatial_dims, bool) or spatial_dims not in SPATIAL_DIMS:
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")


def resolve_memory(memory: str | None, efficient: bool | None, memory_efficient: bool | None = None) -> str:
    """The one place where a memory mode is chosen from the arguments users pass (``efficient`` is the seed
    projects' spelling, ``memory_efficient`` torchvision's and timm's: True means 'efficient', False 'plain')."""
    if memory is not None and memory not in MEMORY_MODES:
        raise ValueError(f"memory must be one of {', '.join(map(repr, MEMORY_MODES))}, got {memory!r}")
    for name, value in (("efficient", efficient), ("memory_efficient", memory_efficient)):
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"{name} must be True or False, got {value!r}")
    if efficient is not None and memory_efficient is not None and efficient != memory_efficient:
        raise ValueError(f"efficient={efficient} contradicts memory_efficient={memory_efficient}; pass only one")
    flag, name = (efficient, "efficient") if efficient is not None else (memory_efficient, "memory_efficient")
    if flag is None:
        return memory or "efficient"
    if memory is not None and (memory == "plain") == flag:
        raise ValueError(f"memory={memory!r} contradicts {name}={flag}; pass only one of them")
    return memory or ("efficient" if flag else "plain")


def check_compile(value: Any, name: str = "compile") -> None:
    """``compile=`` takes True or False, ``scope=`` 'model' (the whole model, the one compiled path); ``compile=``
    also takes 'model'."""
    if value == "layers":
        raise ValueError(f"{name}='layers': regional compile was removed because it was slower than eager; "
                         "set_compile() compiles the whole model")
    if value == "model" or (name == "compile" and isinstance(value, bool)):
        return
    raise ValueError(f"{name} must be {'True or False' if name == 'compile' else repr('model')}, got {value!r}")


def map_size(size: int, index: int, small_inputs: bool) -> int:
    """Size along one axis of feature map ``index`` (``feature_info`` numbering) for an input of ``size``."""
    if not small_inputs:
        size = (size - 1) // 2 + 1  # conv0 7/2, padding 3
        if index == 0:
            return size
        size = (size - 1) // 2 + 1  # max-pool 3/2, padding 1
    for _ in range(max(index - 1, 0)):
        size //= 2  # transition avg-pool 2
    return size


def min_input_size(index: int, small_inputs: bool) -> int:
    """Smallest size along each spatial axis for which feature map ``index`` has at least one position."""
    size = 1
    while map_size(size, index, small_inputs) < 1:
        size += 1
    return size


MAX_PARAMETERS = 2 ** 32  # 16 GiB of float32 weights before a single activation


def _positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")


def _fraction(name: str, value: Any, low_open: bool) -> None:
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (0 < value <= 1 if low_open else 0 <= value < 1):
        raise ValueError(f"{name} must be a number in {'(0, 1]' if low_open else '[0, 1)'}, got {value!r}")


def check_layer(num_input_features: int, growth_rate: int, bn_size: int | None, drop_rate: float,
                spatial_dims: int) -> None:
    """A dense layer's arguments (:class:`~effidense.densenet.DenseLayer`); a layer with no channels in or out
    would build empty convolutions that fail only at the first forward, far from the mistake."""
    _positive_int("num_input_features", num_input_features)
    _positive_int("growth_rate", growth_rate)
    if bn_size is not None:  # None: no bottleneck; 0 would silently mean the same, so it is refused as DenseNet does
        _positive_int("bn_size", bn_size)
    _fraction("drop_rate", drop_rate, low_open=False)
    check_spatial_dims(spatial_dims)


def check_block(num_layers: int, num_input_features: int, growth_rate: int, bn_size: int | None,
                drop_rate: float, spatial_dims: int) -> None:
    """A dense block's arguments (:class:`~effidense.densenet.DenseBlock`): at least one layer, each valid."""
    _positive_int("num_layers", num_layers)
    if num_layers > MAX_LAYERS:
        raise ValueError(f"num_layers={num_layers} is over the {MAX_LAYERS} dense layers supported")
    check_layer(num_input_features, growth_rate, bn_size, drop_rate, spatial_dims)


def check_transition(num_input_features: int, num_output_features: int, spatial_dims: int) -> None:
    """A transition's arguments (:class:`~effidense.densenet.Transition`)."""
    _positive_int("num_input_features", num_input_features)
    _positive_int("num_output_features", num_output_features)
    check_spatial_dims(spatial_dims)


def check_config(growth_rate: int, block_config: Sequence[int], num_init_features: int, bn_size: int | None,
                  compression: float, drop_rate: float, head_drop_rate: float, num_classes: int,
                  in_chans: int, small_inputs: bool, spatial_dims: int) -> None:
    _positive_int("growth_rate", growth_rate)
    _positive_int("num_init_features", num_init_features)
    _positive_int("in_chans", in_chans)
    if bn_size is not None:
        _positive_int("bn_size", bn_size)
    if isinstance(block_config, (str, bytes)) or not isinstance(block_config, Sequence) or not block_config:
        raise ValueError(f"block_config must be a non-empty sequence of layer counts, got {block_config!r}")
    for i, n in enumerate(block_config):
        _positive_int(f"block_config[{i}]", n)
    _fraction("compression", compression, low_open=True)
    _fraction("drop_rate", drop_rate, low_open=False)
    _fraction("head_drop_rate", head_drop_rate, low_open=False)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
    if not isinstance(small_inputs, bool):
        raise ValueError(f"small_inputs must be True or False, got {small_inputs!r}")
    check_spatial_dims(spatial_dims)
    if sum(block_config) > MAX_LAYERS:
        shown = ", ".join(map(_count, block_config))
        raise ValueError(f"block_config ({shown}) has {_count(sum(block_config))} dense layers; at most "
                         f"{MAX_LAYERS} are supported (DenseNet-264 has 130)")
    parts = _weights(growth_rate, block_config, num_init_features, bn_size, compression, spatial_dims, in_chans,
                     num_classes, small_inputs)
    parameters = sum(parts.values())
    if parameters > MAX_PARAMETERS:
        # Named after the part that holds most of them, so the message points at the argument to change.
        cause = {"stem": f"in_chans={in_chans}", "classifier": f"num_classes={num_classes}",
                 "blocks": f"growth_rate={growth_rate}, block_config={tuple(block_config)}"}[max(parts, key=parts.get)]
        raise ValueError(f"{cause} makes about {parameters:.3g} weights ({parameters * 4 / 2 ** 30:.3g} GiB in "
                         f"float32), over the {MAX_PARAMETERS:.3g} supported")


def _count(n: int) -> str:
    """A count as a message shows it: in full, or as 2e+300 where the digits would fill the line."""
    return str(n) if n < 10 ** 15 else f"{n:.3g}"


def count_weights(growth_rate: int, block_config: Sequence[int], channels: int, bn_size: int | None,
                   compression: float, spatial_dims: int, in_chans: int = 0, num_classes: int = 0,
                   small_inputs: bool = False) -> int:
    """The weights of the convolutions and the classifier, counted without building them."""
    return sum(_weights(growth_rate, block_config, channels, bn_size, compression, spatial_dims, in_chans,
                        num_classes, small_inputs).values())


def _weights(growth_rate: int, block_config: Sequence[int], channels: int, bn_size: int | None, compression: float,
             spatial_dims: int, in_chans: int, num_classes: int, small_inputs: bool) -> dict[str, int]:
    """The stem's weights (from ``in_chans``), the dense layers' and transitions', the classifier's."""
    k, total, window = growth_rate, 0, 3 ** spatial_dims
    stem = in_chans * channels * (3 if small_inputs else 7) ** spatial_dims
    for i, n in enumerate(block_config):
        inputs = n * channels + k * n * (n - 1) // 2  # the layers' input channels, summed
        total += inputs * bn_size * k + n * bn_size * k * k * window if bn_size else inputs * k * window
        channels += n * k
        if i < len(block_config) - 1:
            total += channels * int(channels * compression)
            channels = int(channels * compression)
    return {"stem": stem, "blocks": total, "classifier": channels * num_classes}


def check_input(shape: tuple[int, ...], spatial_dims: int, in_chans: int, last_index: int, small_inputs: bool) -> None:
    """Refuse an input the network cannot take: another shape, or too small for feature map ``last_index``."""
    axes = ("L",) if spatial_dims == 1 else ("D", "H", "W")[-spatial_dims:]
    if len(shape) != spatial_dims + 2 or shape[1] != in_chans:
        raise ValueError(f"expected an input of shape (N, {in_chans}, {', '.join(axes)}), got {shape} "
                         f"(spatial_dims={spatial_dims})")
    sizes = shape[2:]
    if map_size(min(sizes), last_index, small_inputs) < 1:
        size = min_input_size(last_index, small_inputs)
        raise ValueError(f"input of {'x'.join(map(str, sizes))} is too small for this DenseNet: needs at least "
                         f"{'x'.join([str(size)] * spatial_dims)}")
