"""Layering rules, read from the source with `ast`, so a change that breaks one fails CI.

- `conveyor.kafka` is the client layer: it imports the standard library, confluent-kafka, its own
  modules, and two leaves every layer shares, `conveyor.errors` (typed errors) and
  `conveyor.settings` (the frozen settings classes it configures clients from). Nothing above
  it: no catalog, runtime, telemetry, store or dlq. Every import counts, at module level, inside
  a function or under `TYPE_CHECKING`.
- The two shared leaves import no other Conveyor module when they are imported (a settings
  method may import lazily what it builds, and type-only imports are allowed).
- `conveyor.ml` has no import circles, counting every import, lazy and type-only ones too.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import pytest

LIBS = Path(__file__).resolve().parents[2] / "libs"
KAFKA = "conveyor.kafka"
SHARED_LEAVES = frozenset({"conveyor.errors", "conveyor.settings"})
THIRD_PARTY_FOR_KAFKA = frozenset({"confluent_kafka"})
# pydantic and pydantic_settings are imported by conveyor.settings, not by kafka/ itself.


def module_name(path: Path) -> str:
    parts = path.relative_to(LIBS).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_under(package: str) -> dict[str, Path]:
    folder = LIBS.joinpath(*package.split("."))
    return {module_name(p): p for p in sorted(folder.rglob("*.py"))}


def _is_module(name: str) -> bool:
    path = LIBS.joinpath(*name.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def _absolute(node: ast.ImportFrom, module: str, is_package: bool) -> str:
    if not node.level:
        return node.module or ""
    parts = module.split(".")
    base = parts if is_package else parts[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join([*base, node.module] if node.module else base)


def imports_in(
    source: str, module: str, *, is_package: bool = False, runtime_only: bool = False
) -> set[str]:
    """The modules `source` imports. Every import statement counts, unless `runtime_only`:
    then only those run when the module is imported (module level, outside `TYPE_CHECKING`).
    `from a import b` names `a.b` when that is one of our modules, else `a`."""
    tree = ast.parse(source)
    nodes: Iterable[ast.AST] = _import_time(tree.body) if runtime_only else ast.walk(tree)
    found: set[str] = set()
    for node in nodes:
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = _absolute(node, module, is_package)
            subs = {f"{base}.{a.name}" for a in node.names if _is_module(f"{base}.{a.name}")}
            found.update(subs or {base})
    found.discard("__future__")
    return found


def _import_time(body: list[ast.stmt]) -> Iterable[ast.stmt]:
    for stmt in body:
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            yield from _import_time(stmt.orelse)
        elif isinstance(stmt, ast.If | ast.Try):
            yield from _import_time(stmt.body)
            yield from _import_time(stmt.orelse)
        else:
            yield stmt


def imports_of(module: str, path: Path, *, runtime_only: bool = False) -> set[str]:
    is_package = path.name == "__init__.py"
    return imports_in(path.read_text(), module, is_package=is_package, runtime_only=runtime_only)


def kafka_layer_violations(module: str, imported: Iterable[str]) -> list[str]:
    """The imports a `conveyor.kafka` module may not make."""
    bad = []
    for name in sorted(imported):
        top = name.split(".")[0]
        if top == "conveyor":
            ok = name == KAFKA or name.startswith(KAFKA + ".") or name in SHARED_LEAVES
        else:
            ok = top in sys.stdlib_module_names or top in THIRD_PARTY_FOR_KAFKA
        if not ok:
            bad.append(f"{module} imports {name}")
    return bad


def cycles(graph: Mapping[str, Iterable[str]]) -> list[list[str]]:
    """The strongly connected components of more than one node (or a node importing itself),
    each sorted: every import circle, found by Tarjan's algorithm."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph.get(node, ()):
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                top = stack.pop()
                on_stack.discard(top)
                component.append(top)
                if top == node:
                    break
            if len(component) > 1 or node in graph.get(node, ()):
                found.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_the_kafka_client_layer_imports_nothing_above_it() -> None:
    modules = modules_under(KAFKA)
    assert len(modules) >= 5, modules  # the rule reads the real package
    bad = [
        line
        for module, path in modules.items()
        for line in kafka_layer_violations(module, imports_of(module, path))
    ]
    assert bad == []


def test_the_leaves_kafka_shares_import_no_conveyor_module_at_import_time() -> None:
    for leaf in sorted(SHARED_LEAVES):
        path = LIBS.joinpath(*leaf.split(".")).with_suffix(".py")
        imported = imports_of(leaf, path, runtime_only=True)
        assert {name for name in imported if name.split(".")[0] == "conveyor"} == set(), leaf


def test_importing_the_kafka_layer_loads_no_conveyor_module_above_it() -> None:
    """The same rule, as the interpreter sees it: what `import conveyor.kafka.*` loads."""
    names = sorted(modules_under(KAFKA))
    code = (
        "import importlib, json, sys\n"
        f"for name in {names!r}: importlib.import_module(name)\n"
        "print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] == 'conveyor')))\n"
    )
    env_path = str(LIBS)
    out = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
        env={"PYTHONPATH": env_path, "PATH": "/usr/bin:/bin"},
    )
    loaded = set(json.loads(out.stdout))
    allowed = {"conveyor", *SHARED_LEAVES}
    assert {m for m in loaded if m not in allowed and not m.startswith(KAFKA)} == set()
    assert set(names) <= loaded


def test_ml_has_no_import_circles() -> None:
    modules = modules_under("conveyor.ml")
    assert "conveyor.ml.registry" in modules and "conveyor.ml.generator" in modules
    graph = {
        module: sorted(n for n in imports_of(module, path) if n in modules and n != module)
        for module, path in modules.items()
    }
    assert cycles(graph) == []


# The rules must be able to fail: each is shown a violation it has to report.


def test_the_kafka_rule_reports_an_import_from_above_even_when_lazy_or_type_only() -> None:
    source = (
        "from typing import TYPE_CHECKING\n"
        "from confluent_kafka import Producer\n"
        "from conveyor.errors import BrokerError\n"
        "from . import protocols\n"
        "if TYPE_CHECKING:\n"
        "    from conveyor.events.catalog import Catalog\n"
        "def f() -> None:\n"
        "    import conveyor.telemetry.tracing\n"
        "    import pydantic\n"
    )
    module = "conveyor.kafka.example"
    assert kafka_layer_violations(module, imports_in(source, module)) == [
        f"{module} imports conveyor.events.catalog",
        f"{module} imports conveyor.telemetry.tracing",
        f"{module} imports pydantic",
    ]


def test_runtime_only_imports_skip_type_only_and_function_level_ones() -> None:
    source = (
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "if TYPE_CHECKING:\n"
        "    from conveyor.events.ingress import TaskRules\n"
        "try:\n"
        "    import conveyor.paths\n"
        "except ImportError:\n"
        "    pass\n"
        "def f() -> None:\n"
        "    from conveyor.ml.registry import ModelRegistry\n"
    )
    got = imports_in(source, "conveyor.settings", runtime_only=True)
    assert got == {"os", "typing", "conveyor.paths"}


@pytest.mark.parametrize(
    ("graph", "expected"),
    [
        ({"a": ["b"], "b": ["c"], "c": []}, []),
        ({"a": ["b"], "b": ["a"], "c": ["a"]}, [["a", "b"]]),
        ({"a": ["b"], "b": ["c"], "c": ["a"], "d": ["d"]}, [["a", "b", "c"], ["d"]]),
    ],
)
def test_cycles_finds_every_circle(graph: dict[str, list[str]], expected: list[list[str]]) -> None:
    assert sorted(cycles(graph)) == expected


def test_the_distribution_installs_one_top_level_package_conveyor() -> None:
    """The services live in `conveyor.services`: a wheel installs no generic `services`."""
    from setuptools import find_packages

    root = LIBS.parent
    config = (root / "pyproject.toml").read_text()
    assert 'where = ["libs"]' in config and 'include = ["conveyor*"]' in config
    packages = find_packages(where=str(LIBS), include=["conveyor*"])
    assert {name.split(".")[0] for name in packages} == {"conveyor"}
    assert "conveyor.services.moderation" in packages
    assert not (root / "services").exists()
    imported = {
        name
        for path in LIBS.joinpath("conveyor").rglob("*.py")
        for name in imports_in(
            path.read_text(), module_name(path), is_package=path.stem == "__init__"
        )
    }
    assert not {name for name in imported if name.split(".")[0] == "services"}
