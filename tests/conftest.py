import importlib
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]

TINY = dict(growth_rate=4, block_config=(2, 2), num_init_features=8, num_classes=5)
# The training commands' tiny model and quick synthetic run (a few tests add to these).
TRAIN_TINY = ["--model", "effi_densenet_bc100_k12", "--model-kwargs", "block_config=(2,2)", "growth_rate=4",
              "num_init_features=8"]
TRAIN_SYNTHETIC = ["--dataset", "synthetic", "--img-size", "8", "-b", "8", "--train-num-samples", "16",
                   "--val-num-samples", "8", "-j", "0", "--warmup-epochs", "0"]

# The last line of a script a test runs in a fresh interpreter, after its checks: one collection now (0.2 s), and the
# interpreter's exit then skips walking every object torch and timm made (its collections take about a second).
QUICK_EXIT = "\nimport gc; gc.collect(); gc.freeze()\n"


def load_tool(name: str) -> ModuleType:
    """The command behind ``tools/<name>.py`` and ``effidense <name>``, so tests can call its ``main(argv)``
    in-process."""
    return importlib.import_module(f"effidense.cli.{name}")


@pytest.fixture(autouse=True, scope="session")
def _one_thread():
    # Test models are tiny: OpenMP threads cost more than they give, and on shared cores they spin against
    # each other (DenseNet-121's first forward: seconds with 2 threads, ~0.05 s with one).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


def perturb_norm(norm: torch.nn.Module, generator: torch.Generator) -> None:
    """Non-default running statistics, affine parameters and batch count for a BatchNorm, drawn from ``generator``,
    so that eval outputs depend on every tensor it holds."""
    with torch.no_grad():
        norm.running_mean.copy_(torch.randn(norm.num_features, generator=generator) * 0.5)
        norm.running_var.copy_(torch.rand(norm.num_features, generator=generator) + 0.5)
        norm.weight.copy_(1 + 0.2 * torch.randn(norm.num_features, generator=generator))
        norm.bias.copy_(0.2 * torch.randn(norm.num_features, generator=generator))
        norm.num_batches_tracked.fill_(7)


class Adapted(torch.nn.Module):
    """A convolution wrapped with a low-rank update beside it, as peft's LoRA wraps one: not a convolution itself
    (no ``in_channels``, ``out_channels`` or ``weight``)."""

    def __init__(self, conv: torch.nn.Conv2d) -> None:
        super().__init__()
        self.base_layer = conv
        self.lora_a = type(conv)(conv.in_channels, 2, conv.kernel_size, conv.stride, conv.padding, bias=False)
        self.lora_b = type(conv)(2, conv.out_channels, 1, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base_layer(x) + self.lora_b(self.lora_a(x))


def offline_with_empty_caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty torchvision cache of the test's own (never the user's) and the Hugging Face hub offline, pointed at an
    empty cache (huggingface_hub reads its constants at import, so the environment alone would come too late in this
    process). Returns the torchvision cache's ``TORCH_HOME``."""
    import huggingface_hub

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty_hub"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return tmp_path / "torch"


def one_line_error(err: str) -> str:
    """The one line a command printed on stderr (and no traceback)."""
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "Traceback" not in err
    return lines[0]


def fused_then_apart(monkeypatch: pytest.MonkeyPatch, fused: list[bool]) -> Iterator[bool]:
    """Yields False, then True (apart): first with each of frugal's choices to run a block's last layer and the
    transition after it as one segment (``Transition.frees_after``) recorded in ``fused``, then with every such pair
    run apart."""
    from effidense.densenet import Transition

    frees_after = Transition.frees_after
    monkeypatch.setattr(Transition, "frees_after", lambda *args: fused.append(frees_after(*args)) or fused[-1])
    yield False
    monkeypatch.setattr(Transition, "frees_after", lambda *args: False)
    yield True
