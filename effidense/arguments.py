"""A DenseNet's arguments, checked before anything is built, each failure one ``ValueError`` line naming the
argument; the one place a memory mode is chosen from its spellings; feature-map sizes for an input size."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

__all__ = ["MEMORY_MODES", "check_block", "check_compile", "check_config", "check_counts", "check_fraction",
           "check_input", "check_layer", "check_positive", "check_slices", "check_spatial_dims", "check_transition",
           "map_size", "min_input_size", "resolve_memory"]

MEMORY_MODES = ("plain", "efficient", "frugal")
MAX_LAYERS = 10_000  # DenseNet-264 has 130 dense layers; far more only exhausts memory while building
MAX_PARAMETERS = 2 ** 32  # 16 GiB of float32 weights before a single activation


def resolve_memory(memory: str | None, efficient: bool | None, memory_efficient: bool | None = None) -> str:
    """The memory mode from ``memory`` or a flag (``efficient``, the seed projects' spelling, or ``memory_efficient``,
    torchvision's and timm's: True means 'efficient', False 'plain')."""
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
    """``compile=`` takes True, False or 'model'; ``scope=`` 'model' (the whole model, the one compiled path)."""
    if value == "layers":
        raise ValueError(f"{name}='layers': regional compile was removed because it was slower than eager; "
                         "set_compile() compiles the whole model")
    if value != "model" and not (name == "compile" and isinstance(value, bool)):
        raise ValueError(f"{name} must be {'True or False' if name == 'compile' else repr('model')}, got {value!r}")


def check_slices(value: Any) -> None:
    """``backward_slices``: 'auto', None (never sliced) or a number of slices (at most the batch is used)."""
    if value not in ("auto", None) and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"backward_slices must be 'auto', None (not sliced) or a positive number of slices, got "
                         f"{value!r}")


def map_size(size: int, index: int, small_inputs: bool) -> int:
    """Size along one axis of feature map ``index`` (``feature_info`` numbering) for an input of ``size``."""
    if not small_inputs:
        size = (size - 1) // 2 + 1  # conv0 7/2, padding 3
        if index == 0:
            return size
        size = (size - 1) // 2 + 1  # max-pool 3/2, padding 1
    return size // 2 ** max(index - 1, 0)  # transition avg-pools 2


def min_input_size(index: int, small_inputs: bool) -> int:
    """Smallest size along each spatial axis for which feature map ``index`` has at least one position."""
    size = 1
    while map_size(size, index, small_inputs) < 1:
        size += 1
    return size


def check_input(shape: tuple[int, ...], spatial_dims: int, in_chans: int, last_index: int, small_inputs: bool) -> None:
    """Refuse an input the network cannot take: another shape, or too small for feature map ``last_index``."""
    if len(shape) != spatial_dims + 2 or shape[1] != in_chans:
        axes = ("L",) if spatial_dims == 1 else ("D", "H", "W")[-spatial_dims:]
        raise ValueError(f"expected an input of shape (N, {in_chans}, {', '.join(axes)}), got {shape} "
                         f"(spatial_dims={spatial_dims})")
    if map_size(min(shape[2:]), last_index, small_inputs) < 1:
        size = min_input_size(last_index, small_inputs)
        raise ValueError(f"input of {'x'.join(map(str, shape[2:]))} is too small for this DenseNet: needs at least "
                         f"{'x'.join([str(size)] * spatial_dims)}")


def check_positive(**values: Any) -> None:
    """Each value a positive integer (a bool is not one)."""
    for name, value in values.items():
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


def check_fraction(name: str, value: Any, low_open: bool = False) -> None:
    """A number in [0, 1), or in (0, 1] with ``low_open``."""
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    if not number or not (0 < value <= 1 if low_open else 0 <= value < 1):
        raise ValueError(f"{name} must be a number in {'(0, 1]' if low_open else '[0, 1)'}, got {value!r}")


def check_spatial_dims(spatial_dims: Any) -> None:
    if isinstance(spatial_dims, bool) or spatial_dims not in (1, 2, 3):
        raise ValueError(f"spatial_dims must be 1, 2 or 3, got {spatial_dims!r}")


def check_counts(name: str, value: Any) -> None:
    """A non-empty sequence of layer counts."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or not value:
        raise ValueError(f"{name} must be a non-empty sequence of layer counts, got {value!r}")
    check_positive(**{f"{name}[{i}]": n for i, n in enumerate(value)})


def check_layer(num_input_features: int, growth_rate: int, bn_size: int | None, drop_rate: float,
                spatial_dims: int) -> None:
    """A dense layer's arguments: one with no channels in or out would fail only at its first forward."""
    check_positive(num_input_features=num_input_features, growth_rate=growth_rate)
    if bn_size is not None:  # None: no bottleneck; 0 would silently mean the same, so it is refused
        check_positive(bn_size=bn_size)
    check_fraction("drop_rate", drop_rate)
    check_spatial_dims(spatial_dims)


def check_block(num_layers: int, num_input_features: int, growth_rate: int, bn_size: int | None,
                drop_rate: float, spatial_dims: int) -> None:
    check_positive(num_layers=num_layers)
    if num_layers > MAX_LAYERS:
        raise ValueError(f"num_layers={num_layers} is over the {MAX_LAYERS} dense layers supported")
    check_layer(num_input_features, growth_rate, bn_size, drop_rate, spatial_dims)


def check_transition(num_input_features: int, num_output_features: int, spatial_dims: int) -> None:
    check_positive(num_input_features=num_input_features, num_output_features=num_output_features)
    check_spatial_dims(spatial_dims)


def check_config(growth_rate: int, block_config: Sequence[int], num_init_features: int, bn_size: int | None,
                 compression: float, drop_rate: float, head_drop_rate: float, num_classes: int, in_chans: int,
                 small_inputs: bool, spatial_dims: int) -> None:
    check_positive(growth_rate=growth_rate, num_init_features=num_init_features, in_chans=in_chans)
    if bn_size is not None:
        check_positive(bn_size=bn_size)
    check_counts("block_config", block_config)
    check_fraction("compression", compression, low_open=True)
    check_fraction("drop_rate", drop_rate)
    check_fraction("head_drop_rate", head_drop_rate)
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 0:
        raise ValueError(f"num_classes must be a non-negative integer, got {num_classes!r}")
    if not isinstance(small_inputs, bool):
        raise ValueError(f"small_inputs must be True or False, got {small_inputs!r}")
    check_spatial_dims(spatial_dims)
    if sum(block_config) > MAX_LAYERS:
        shown = ", ".join(map(_count, block_config))
        raise ValueError(f"block_config ({shown}) has {_count(sum(block_config))} dense layers; at most "
                         f"{MAX_LAYERS} are supported (DenseNet-264 has 130)")
    # The convolutions' and classifier's weights, counted without building them, by the part that holds them.
    k, blocks, channels = growth_rate, 0, num_init_features
    for i, n in enumerate(block_config):
        inputs = n * channels + k * n * (n - 1) // 2  # the layers' input channels, summed
        blocks += inputs * bn_size * k + n * bn_size * k * k * 3 ** spatial_dims if bn_size else \
            inputs * k * 3 ** spatial_dims
        channels += n * k
        if i < len(block_config) - 1:
            blocks += channels * int(channels * compression)
            channels = int(channels * compression)
    parts = {f"in_chans={in_chans}": in_chans * num_init_features * (3 if small_inputs else 7) ** spatial_dims,
             f"num_classes={num_classes}": channels * num_classes,
             f"growth_rate={growth_rate}, block_config={tuple(block_config)}": blocks}
    if sum(parts.values()) > MAX_PARAMETERS:  # named after the part that holds most, the argument to change
        raise ValueError(f"{max(parts, key=parts.get)} makes about {sum(parts.values()):.3g} weights "
                         f"({sum(parts.values()) * 4 / 2 ** 30:.3g} GiB in float32), over the {MAX_PARAMETERS:.3g} "
                         "supported")


def _count(n: int) -> str:
    """A count as a message shows it: in full, or as 2e+300 where the digits would fill the line."""
    return str(n) if n < 10 ** 15 else f"{n:.3g}"
