"""The packages import downwards only: core knows nothing of proxy, and each layer of proxy/ uses the
layers below it (docs/architecture.md, "Code map"), never one above. Lazy imports inside functions
count too: they are cycles that import order happens to hide."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# Lowest first: a module may import its own layer and those before it.
LAYERS = ["core", "proxy.config", "proxy.http", "proxy.http2", "proxy.routing", "proxy.upstream", "proxy.observe", "proxy.serve"]


def layer_of(module: str) -> int | None:
    for index in range(len(LAYERS) - 1, -1, -1):
        if module == LAYERS[index] or module.startswith(LAYERS[index] + "."):
            return index
    return None


def imported_modules(path: Path) -> list[tuple[int, str]]:
    tree = ast.parse(path.read_text(), str(path))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.lineno, node.module))
    return found


def test_no_module_imports_a_higher_layer():
    problems = []
    for path in sorted(list((ROOT / "core").rglob("*.py")) + list((ROOT / "proxy").rglob("*.py"))):
        module = ".".join(path.relative_to(ROOT).with_suffix("").parts)
        own = layer_of(module)
        for line, target in imported_modules(path):
            other = layer_of(target)
            if own is not None and other is not None and other > own:
                problems.append(f"{path.relative_to(ROOT)}:{line}: {LAYERS[own]} imports {target}")
    assert problems == []


def test_the_layers_cover_every_package():
    packages = {path.parent.relative_to(ROOT).as_posix().replace("/", ".")
                for path in (ROOT / "proxy").rglob("__init__.py")} - {"proxy"}
    assert packages <= set(LAYERS)


def test_the_check_finds_an_upward_import(tmp_path):
    module = tmp_path / "health.py"
    module.write_text("def f():\n    from proxy.serve.app import Application\n")
    (line, target), = imported_modules(module)
    assert layer_of(target) > layer_of("proxy.upstream.health")


def test_tests_share_helpers_through_tests_support_only():
    """A test module never imports another test module, and scripts import nothing from tests/."""
    problems = []
    for path in sorted((ROOT / "tests").rglob("*.py")):
        for line, target in imported_modules(path):
            if target.split(".")[-1].startswith("test_") or (target == "tests" and path.name.startswith("test_")):
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports {target}")
    scripts = [path for path in (ROOT / "scripts").rglob("*") if path.is_file()
               and (path.suffix == ".py" or path.read_bytes().startswith(b"#!/usr/bin/env python"))]
    for path in scripts:
        for line, target in imported_modules(path):
            if target == "tests" or target.startswith("tests."):
                problems.append(f"{path.relative_to(ROOT)}:{line}: imports {target}")
    assert problems == []
