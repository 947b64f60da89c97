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


HEAVY = ("torch", "timm", "torchvision", "numpy", "safetensors", "huggingface_hub")


def imported_modules(*args: str) -> tuple[set[str], str]:
    """The modules ``python -m effidense ARGS`` imports (python -X importtime), and its stderr without them."""
    done = subprocess.run([sys.executable, "-X", "importtime", "-m", "effidense", *args], capture_output=True,
                          text=True, cwd=ROOT)
    lines = done.stderr.splitlines()
    modules = {line.rsplit("|", 1)[1].strip() for line in lines if line.startswith("import time:")}
    return modules - {"package"}, "\n".join(line for line in lines if not line.startswith("import time:"))


LIGHT_HELP = sorted(COMMANDS)


@pytest.mark.parametrize("args", [["--help"], ["bnech"], *([c, "--help"] for c in LIGHT_HELP), ["convert"],
                                  ["models"], ["bench", "--steps", "0"], ["gradcheck", "--amp", "fp8"],
                                  ["train", "--epochs", "x"]])
def test_help_and_usage_errors_import_no_heavy_module(args):
    modules, err = imported_modules(*args)
    assert "effidense.cli" in modules and "Traceback" not in err  # the measurement works
    heavy = sorted(m for m in modules if m.split(".")[0] in HEAVY)
    assert heavy == [], heavy


def test_a_mistyped_command_or_model_gets_the_nearest_name(capsys):
    assert main(["bnech"]) == 2
    assert capsys.readouterr().err.strip() == "error: unknown command 'bnech'; did you mean 'bench'? (effidense --help)"
    from effidense.modelspec import resolve_model

    with pytest.raises(ValueError, match=r"^unknown model 'effi_densnet121'; did you mean 'effi_densenet121'\? "
                                         r"\(`effidense models` lists all 19\)$"):
        resolve_model("effi_densnet121")


def test_models_lists_every_name(capsys):
    from effidense.configs import CONFIGS

    assert main(["models"]) == 0
    out = capsys.readouterr().out
    assert all(f"effi_{name} " in out for name in CONFIGS) and "19 in all" in out


@pytest.mark.parametrize("rank, waits", [(None, False), ("0", False), ("1", True)])
def test_usage_errors_are_one_line_and_other_ranks_leave_them_to_rank_zero(rank, waits, monkeypatch, capsys):
    """Rank 0 (or a process outside torchrun) prints at once. Another rank waits for torchrun to end it once rank 0
    has failed, for exiting first would have torchrun end rank 0 before it printed; still alive after the wait, it
    prints the error itself."""
    from effidense.cli import bench, flags, train

    if rank is None:
        monkeypatch.delenv("RANK", raising=False)
    else:
        monkeypatch.setenv("RANK", rank)
    waited = []
    monkeypatch.setattr(flags.time, "sleep", waited.append)
    for tool in (bench, train):
        with pytest.raises(SystemExit) as exc:
            tool.main(["--model-kwargs", "growth_rate"])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1
        assert "argument --model-kwargs: 'growth_rate' is not KEY=VALUE" in err and err.strip().endswith("--help)")
    assert waited == ([flags.RANK_WAIT_S] * 2 if waits else [])


def interrupted_while_starting(route: list[str]) -> tuple[int, str]:
    """Start ``route`` (a command that loads torch for seconds), send Ctrl-C as soon as effidense's dispatcher is
    loaded and again every 0.1 s until it exits; its exit code and stderr (without the import-time lines)."""
    import os
    import signal
    import threading
    import time

    env = {**os.environ, "PYTHONPROFILEIMPORTTIME": "1"}  # stderr says when effidense.cli is loaded
    process = subprocess.Popen(route, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    lines: list[str] = []
    loaded = threading.Event()

    def drain() -> None:  # a full pipe would stall the command
        for line in process.stderr:
            lines.append(line)
            if line.rstrip().endswith("| effidense.cli"):
                loaded.set()
        loaded.set()

    reader = threading.Thread(target=drain, daemon=True)
    reader.start()
    try:
        assert loaded.wait(30), "the command never loaded effidense.cli"
        time.sleep(0.05)
        deadline = time.monotonic() + 30
        while process.poll() is None and time.monotonic() < deadline:
            process.send_signal(signal.SIGINT)
            time.sleep(0.1)
        assert process.poll() is not None, "Ctrl-C did not stop the command"
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        reader.join(5)
    return process.returncode, "".join(line for line in lines if not line.startswith("import time:"))


@pytest.mark.parametrize("route", [[sys.executable, "-m", "effidense", "plan", "--variants", "plain", "--quiet"],
                                   ["effidense", "gradcheck", "--quiet"],
                                   [sys.executable, str(ROOT / "tools" / "bench.py"), "--quiet"]],
                         ids=["python -m", "console script", "tools front"])
def test_ctrl_c_while_a_command_starts_is_one_line_and_130(route):
    # The first signal lands while the command imports torch (seconds), where Ctrl-C printed a traceback.
    if not shutil.which(route[0]):
        pytest.skip(f"{route[0]} is not installed")
    code, err = interrupted_while_starting(route)
    assert "Traceback" not in err, err
    assert (code, err.strip()) == (130, "effidense: interrupted (Ctrl-C)"), (code, err)


@pytest.mark.parametrize("ctrl_c", [True, False], ids=["after a Ctrl-C", "without one"])
def test_a_ctrl_c_that_python_turns_into_another_error_is_still_one_line_and_130(ctrl_c):
    # CPython can turn a Ctrl-C into another exception where it lands inside an import (building an ImportError it
    # raises "TypeError: expected a message argument"): seen once as a traceback from torch's import. The same error
    # without a Ctrl-C is a bug to show in full.
    script = ("import os, signal, sys; import effidense.cli as cli; sys.argv = ['effidense', 'models']\n"
              "def run(argv):\n"
              "    try:\n"
              f"        {'os.kill(os.getpid(), signal.SIGINT)' if ctrl_c else 'raise KeyboardInterrupt'}\n"
              "        signal.sigtimedwait([], 5)\n"  # the handler runs at the next bytecode; this only waits
              "    except KeyboardInterrupt:\n"
              "        raise TypeError('expected a message argument') from None\n"
              "cli._run = run\n"
              "sys.exit(cli.main())")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=ROOT)
    if ctrl_c:
        assert (result.returncode, result.stderr.strip()) == (130, "effidense: interrupted (Ctrl-C)"), result
    else:
        assert result.returncode == 1 and "TypeError: expected a message argument" in result.stderr, result


@pytest.mark.parametrize("command", [["models"], ["nope"]], ids=["succeeded", "failed"])
def test_ctrl_c_after_a_command_ends_leaves_its_exit_code(command):
    # The process still has to exit (torch's handlers, the interpreter's teardown); a Ctrl-C then killed it with the
    # signal's code and no line, or printed a traceback.
    script = ("import os, signal, sys; from effidense.cli import main; sys.argv = ['effidense', *sys.argv[1:]]; "
              "code = main(); os.kill(os.getpid(), signal.SIGINT); sys.exit(code)")
    result = subprocess.run([sys.executable, "-c", script, *command], capture_output=True, text=True, cwd=ROOT)
    assert result.returncode == (0 if command == ["models"] else 2), result
    assert "Traceback" not in result.stderr and "KeyboardInterrupt" not in result.stderr, result.stderr
