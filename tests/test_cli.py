"""The installed command, ``python -m effidense`` and the tools/ fronts reach the same commands."""
import shutil
import subprocess
import sys

import pytest
from conftest import ROOT

from effidense.cli import COMMANDS, main


def test_dispatcher_lists_commands_and_refuses_unknown(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(name in out for name in COMMANDS)
    assert main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_route_shows_the_same_help(command):
    routes = [[sys.executable, "-m", "effidense", command]]
    if command != "timm":  # no tools/timm.py: that name would shadow the timm package for every tools/ script
        tool = ROOT / "tools" / f"{command.replace('-', '_')}.py"  # a module name has no hyphen
        routes.insert(0, [sys.executable, str(tool)])
    if shutil.which("effidense"):
        routes.append(["effidense", command])
    helps = [subprocess.run([*route, "--help"], capture_output=True, text=True, check=True, cwd=ROOT).stdout
             for route in routes]
    assert helps[0].startswith(f"usage: effidense {command}")
    assert all(h == helps[0] for h in helps)
