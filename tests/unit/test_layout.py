"""The import graph keeps its direction, read from the code's own imports (ast, nothing run).

docs/architecture.md states these directions; this file is their check.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = ("watcher", "rules")


def _module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _is_module(name: str) -> bool:
    base = REPO.joinpath(*name.split("."))
    return base.with_suffix(".py").is_file() or (base / "__init__.py").is_file()


def _imports(path: Path) -> set[str]:
    """Every module of this repository that ``path`` imports (``from a import b`` names a.b
    when b is a module, else a), relative imports resolved."""
    mod = _module_name(path)
    package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package.split(".")[:len(package.split(".")) - node.level + 1])
                where = f"{base}.{node.module}" if node.module else base
            else:
                where = node.module or ""
            found.add(where)
            found |= {f"{where}.{a.name}" for a in node.names if _is_module(f"{where}.{a.name}")}
    return {m for m in found if m.split(".")[0] in PACKAGES}


GRAPH: dict[str, set[str]] = {
    _module_name(p): _imports(p) for pkg in PACKAGES for p in sorted((REPO / pkg).rglob("*.py"))}


def _importers(target: str) -> set[str]:
    return {m for m, deps in GRAPH.items() if target in deps}


def test_the_graph_is_read() -> None:
    """The reader finds the modules and the imports it checks (no check passes on nothing)."""
    assert {"watcher.app", "watcher.daemon", "watcher.core.control", "rules.firewall"} <= set(GRAPH)
    assert "watcher.daemon" in GRAPH["watcher.app"]
    assert "watcher.core.control" in GRAPH["watcher.daemon"]
    assert "watcher.sources._netlink" in GRAPH["watcher.sources.sock_diag"]


def test_nothing_but_the_cli_imports_the_composition_root() -> None:
    """watcher/app.py is imported by the CLI alone."""
    assert {m for m in _importers("watcher.app") if not m.startswith("watcher.cli.")} == set()


def test_only_the_composition_root_imports_the_daemon() -> None:
    """The daemon is built in one place: watcher/app.py."""
    assert _importers("watcher.daemon") <= {"watcher.app"}


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("rules")))
def test_rules_never_imports_watcher(module: str) -> None:
    """The firewall engine knows nothing of the agent."""
    assert {d for d in GRAPH[module] if d.startswith("watcher")} == set()


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("watcher.sources.")))
def test_sources_import_neither_each_other_nor_rules(module: str) -> None:
    """A source imports no other source (shared private helpers, named _x, excepted) and
    nothing of rules/; nor the daemon, the outputs or the CLI."""
    for dep in GRAPH[module]:
        if dep.startswith("watcher.sources."):
            assert dep.rpartition(".")[2].startswith("_"), f"{module} imports {dep}"
        assert not dep.startswith(("rules", "watcher.daemon", "watcher.app", "watcher.outputs",
                                   "watcher.cli")), f"{module} imports {dep}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("watcher.core")))
def test_the_core_imports_only_pure_modules(module: str) -> None:
    """The control core imports the core, the configuration's declarations, the exit codes
    and the pure rules.model: no source, output, shell, file or firewall engine."""
    allowed = ("watcher.core", "watcher.config", "watcher.errors", "rules.model", "rules.errors")
    for dep in GRAPH[module] - {"watcher", "rules"}:
        assert dep.startswith(allowed), f"{module} imports {dep}"


@pytest.mark.parametrize("module", sorted(m for m in GRAPH if m.startswith("watcher.outputs.")))
def test_outputs_do_not_reach_back_into_the_shell(module: str) -> None:
    """Outputs render what the core decided: they import no source, no daemon, no CLI."""
    for dep in GRAPH[module]:
        assert not dep.startswith(("watcher.sources", "watcher.daemon", "watcher.app",
                                   "watcher.cli", "rules.firewall", "rules.backends")), \
            f"{module} imports {dep}"
