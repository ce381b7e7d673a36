"""The CLI is one package, services/cli/: its modules form no import cycle, a command group
imports no module of the package but `common`, no other module of services/ imports the CLI
(or typer), and `corral --help` lists every group.

Imports are read from the sources with `ast`, not by importing them, so every import counts,
one inside a function too.
"""

from __future__ import annotations

import ast
import importlib
import re
from collections.abc import Collection
from pathlib import Path

import typer
from typer.testing import CliRunner

ROOT = Path(__file__).resolve().parents[1]
SERVICES = ROOT / "services"
CLI = SERVICES / "cli"
NOT_GROUPS = {"services.cli", "services.cli.__main__", "services.cli.common"}
DOCUMENTED = {"service", "up", "demo", "submit", "status", "contracts", "cost", "policy", "budget", "breakers", "sim"}


def _name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path, modules: Collection[str] = ()) -> set[str]:
    """The absolute names of what PATH imports; `from P import m` names P.m when that is one of MODULES."""
    package = _name(path) if path.name == "__init__.py" else _name(path).rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.rsplit(".", node.level - 1)[0]
                base = f"{anchor}.{base}" if base else anchor
            for alias in node.names:
                names.add(f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base)
    return names


def _cli_graph() -> dict[str, set[str]]:
    """Each module of the CLI package -> the modules of the package it imports."""
    paths = {_name(path): path for path in CLI.glob("*.py")}
    modules = set(paths)
    return {name: (_imports(path, modules) & modules) - {name} for name, path in paths.items()}


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    done: set[str] = set()

    def visit(path: list[str]) -> list[str] | None:
        for nxt in sorted(graph[path[-1]]):
            if nxt in path:
                return path[path.index(nxt):] + [nxt]
            if nxt not in done and (found := visit(path + [nxt])):
                return found
        done.add(path[-1])
        return None

    return next((found for start in sorted(graph) if (found := visit([start]))), None)


def _is_cli_code(name: str) -> bool:
    return name in ("services.cli", "typer") or name.startswith(("services.cli.", "typer."))


def test_the_module_graph_check_finds_a_cycle_and_passes_a_tree():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) is None


def test_the_cli_package_has_no_import_cycle_between_its_modules():
    graph = _cli_graph()
    assert "services.cli.common" in graph
    assert _cycle(graph) is None


def test_a_command_group_imports_no_module_of_the_cli_but_common():
    graph = _cli_graph()
    groups = set(graph) - NOT_GROUPS
    assert {"services.cli.stack", "services.cli.policy", "services.cli.sim"} <= groups
    for group in groups:
        assert graph[group] <= {"services.cli.common"}, f"{group} imports {graph[group]}"
    assert graph["services.cli.common"] == set()


def test_no_code_outside_the_cli_imports_it_or_typer_and_no_service_package_imports_rich():
    for path in SERVICES.rglob("*.py"):
        if CLI in path.parents:
            continue
        imports = _imports(path)
        assert not {name for name in imports if _is_cli_code(name)}, f"{path.relative_to(ROOT)} imports CLI code"
        if path.parent != SERVICES:  # a service package: guard/, budget/, …
            assert not {n for n in imports if n.split(".")[0] == "rich"}, f"{path.relative_to(ROOT)} imports rich"


def test_every_typer_of_a_command_group_is_registered_in_the_root():
    from services.cli import app

    registered = [group.typer_instance for group in app.registered_groups]
    for name in set(_cli_graph()) - NOT_GROUPS:
        module = importlib.import_module(name)
        for attr, value in vars(module).items():
            if isinstance(value, typer.Typer):
                assert any(value is typer_ for typer_ in registered), f"{name}.{attr} is not added to the root app"


def test_corral_help_lists_every_command_group_and_top_level_command():
    from services.cli import app

    result = CliRunner().invoke(app, ["--help"])
    assert result.exit_code == 0, result.output
    listed = set(re.findall(r"^│ (\S+)\s", result.output, re.MULTILINE))
    commands = set(typer.main.get_command(app).commands)
    assert DOCUMENTED <= commands
    assert commands <= listed
