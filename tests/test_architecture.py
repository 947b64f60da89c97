"""The house rules that code review would otherwise have to remember: one atomic writer, short modules, no private
names across modules, no import cycle, and a library that never imports the tooling."""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "effidense"
# The commands and what only they use; the library (models, layers, weights, conversion, the meter, the planner and
# the harness the tools share) stands alone.
TOOLING = ("benchmark", "verify", "gpu_report", "cli", "train", "__main__")


def _module(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """The effidense modules ``path`` imports (relative imports resolved)."""
    package = _module(path).split(".") if path.name == "__init__.py" else _module(path).split(".")[:-1]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join([*base, *(node.module.split(".") if node.module else [])])
            found |= {module} | {f"{module}.{alias.name}" for alias in node.names}
        elif isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
    return {name for name in found if name.split(".")[0] == "effidense"}


def test_one_atomic_writer_and_modules_under_600_lines() -> None:
    renames = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py")
               if "os.replace(" in p.read_text() and p.name != "fileio.py"]
    assert renames == []  # effidense.fileio.publish is the one rename: the trainer's checkpoints commit through it
    long = [str(p.relative_to(ROOT)) for p in PACKAGE.rglob("*.py") if len(p.read_text().splitlines()) >= 600]
    assert long == []


def test_no_private_name_is_imported_across_modules() -> None:
    private = []
    for path in [*PACKAGE.rglob("*.py"), *(ROOT / "tests").rglob("*.py"), *(ROOT / "tools").rglob("*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                private += [f"{path.relative_to(ROOT)}:{node.lineno} {alias.name}" for alias in node.names
                            if alias.name.startswith("_") and not alias.name.startswith("__")]
    assert private == []


def test_the_library_never_imports_the_tooling() -> None:
    tooling = tuple(f"effidense.{room}" for room in TOOLING)
    library = [p for p in PACKAGE.rglob("*.py") if not _module(p).startswith(tooling)]
    assert len(library) > 10
    crossing = sorted(f"{_module(p)} imports {name}" for p in library for name in _imports(p)
                      if name.startswith(tooling))
    assert crossing == []


def test_the_tools_share_the_harness_not_each_other() -> None:
    # bench, plan, gradcheck and gpu-report are built on effidense.harness; only the bench command uses bench's room.
    users = sorted(_module(p) for p in PACKAGE.rglob("*.py") if not _module(p).startswith("effidense.benchmark")
                   and any(name.startswith("effidense.benchmark") for name in _imports(p)))
    assert users == ["effidense.cli.bench"]
    assert any(name.startswith("effidense.harness") for name in _imports(PACKAGE / "planner" / "core.py"))


def test_no_import_cycle_among_modules() -> None:
    imports = {_module(p): _imports(p) for p in PACKAGE.rglob("*.py")}  # each file parsed once
    graph = {name: {m for m in imports if m != name and any(i == m or i.startswith(f"{m}.") for i in found)
                    and not name.startswith(f"{m}.")} for name, found in imports.items()}
    seen: dict[str, int] = {}

    def visit(name: str, stack: list[str]) -> list[str] | None:
        seen[name] = 1
        for nxt in sorted(graph[name]):
            if seen.get(nxt) == 1:
                return [*stack, name, nxt]
            if nxt not in seen and (cycle := visit(nxt, [*stack, name])):
                return cycle
        seen[name] = 2
        return None

    cycles = [cycle for name in sorted(imports) if name not in seen and (cycle := visit(name, []))]
    assert cycles == []
