"""effidense's public face: what `import effidense` offers, and nothing else."""
from __future__ import annotations

import subprocess
import sys

import pytest

import effidense


def test_dir_lists_the_public_names_and_each_resolves() -> None:
    assert dir(effidense) == sorted([*effidense.__all__, "__version__"])
    for name in effidense.__all__:
        assert getattr(effidense, name) is not None, name
    assert {"DenseNet", "DenseBlock", "DenseLayer", "Transition", "densenet121", "SavedTensorMeter", "plan",
            "convert"} <= set(effidense.__all__)
    assert not {"Any", "annotations", "importlib", "os", "sys", "registry", "fileio"} & set(dir(effidense))


def test_star_import_gives_exactly_the_public_names() -> None:
    namespace: dict[str, object] = {}
    exec("from effidense import *", namespace)
    assert set(namespace) - {"__builtins__"} == set(effidense.__all__)


def test_a_name_that_is_not_there_is_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="has no attribute 'densenet_121'"):
        effidense.densenet_121  # noqa: B018


def test_import_is_light_for_the_command() -> None:
    """The command's own import loads no torch until a subcommand needs it (--help answers at once)."""
    code = "import sys; sys.argv = ['effidense']; import effidense; print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
