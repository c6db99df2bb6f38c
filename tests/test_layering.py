"""The package layering holds: no import cycles, no hidden (function-level) imports, no upward imports.

Read from the source's AST, so an import inside a function counts as much as one at the top.
"""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

import cargohold

SRC = Path(cargohold.__file__).parent

# Higher imports lower (or the same level), never the reverse. devtools is above everything and nothing in the
# package imports it (tests and the demo do).
LEVELS = {
    "devtools": 7,
    "cli": 6, "cri": 6,
    "client": 5,
    "services": 4,
    "store": 3, "config": 3,  # the config names each package's defaults; only store, client and cli read it
    "remotes": 2, "images": 2, "unpack": 2,
    "content": 1, "snapshots": 1, "diff": 1,
    "oci": 0, "metadata": 0, "errors": 0, "grpcserve": 0, "events": 0, "stages": 0,
}

# The lazy loads of grpc-heavy modules, so that grpc is imported only when it is used.
ALLOWED_LAZY = {
    ("cargohold.snapshots", "cargohold.snapshots.proxy"),
    ("cargohold.cli.runtime", "cargohold.cri.server"),
    ("cargohold.cli.runtime", "cargohold.snapshots.server"),
    # The client imports each service a pull does not use in the methods that call it, so that a command loads
    # only its own service: start-up is most of a second pull's time (issue 14: a second pull in <= 0.3 s).
    *(("cargohold.client", f"cargohold.services.{service}") for service in (
        "archive", "copy", "imagelist", "inspect", "maintenance", "mount", "push", "referrers", "runtime")),
}


def _module_name(path: Path) -> str:
    parts = ["cargohold", *path.relative_to(SRC).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(p): p for p in sorted(SRC.rglob("*.py"))}


def _target(module: str) -> str:
    """The module an import of ``module`` (or of a name from it) lands in: itself, or its longest known prefix."""
    while module not in MODULES and "." in module:
        module = module.rsplit(".", 1)[0]
    return module


def _imports(name: str) -> list[tuple[str, bool]]:
    """(imported cargohold module, at function level) for every import in module ``name``."""
    tree = ast.parse(MODULES[name].read_text(), str(MODULES[name]))
    is_pkg = MODULES[name].name == "__init__.py"
    out: list[tuple[str, bool]] = []

    def visit(node: ast.AST, nested: bool) -> None:
        for child in ast.iter_child_nodes(node):
            inner = nested or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
            if isinstance(child, ast.Import):
                out.extend((_target(a.name), nested) for a in child.names if a.name.startswith("cargohold"))
            elif isinstance(child, ast.ImportFrom):
                base = child.module or ""
                if child.level:
                    anchor = name if is_pkg else name.rsplit(".", 1)[0]
                    for _ in range(child.level - 1):
                        anchor = anchor.rsplit(".", 1)[0]
                    base = f"{anchor}.{base}" if base else anchor
                if base.startswith("cargohold"):
                    for alias in child.names:
                        sub = f"{base}.{alias.name}"
                        out.append((sub if sub in MODULES else _target(base), nested))
            visit(child, inner)

    visit(tree, False)
    return [(m, nested) for m, nested in out if m != name]


GRAPH = {name: _imports(name) for name in MODULES}


def _package(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One cycle of ``graph``, or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def walk(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return [*stack[stack.index(nxt):], nxt]
            if nxt not in state and (found := walk(nxt)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := walk(node)) is not None:
            return found
    return None


@pytest.mark.parametrize("name", sorted(MODULES))
def test_every_module_imports(name: str) -> None:
    importlib.import_module(name)


def test_no_function_level_imports() -> None:
    hidden = sorted((name, target) for name, imports in GRAPH.items() for target, nested in imports
                    if nested and (name, target) not in ALLOWED_LAZY)
    assert hidden == []


def test_no_module_import_cycle() -> None:
    graph = {name: {t for t, _ in imports} for name, imports in GRAPH.items()}
    assert _cycle(graph) is None


def test_no_package_import_cycle() -> None:
    graph: dict[str, set[str]] = {}
    for name, imports in GRAPH.items():
        for target, _ in imports:
            a, b = _package(name), _package(target)
            if a and b and a != b:
                graph.setdefault(a, set()).add(b)
    assert _cycle(graph) is None


def test_lower_packages_never_import_higher() -> None:
    assert set(LEVELS) == {_package(m) for m in MODULES if _package(m)}, "every package has a level"
    upward = sorted(
        (name, target) for name, imports in GRAPH.items() for target, _ in imports
        if _package(name) and _package(target) and (name, target) not in ALLOWED_LAZY
        and LEVELS[_package(name)] < LEVELS[_package(target)]
    )
    assert upward == []
