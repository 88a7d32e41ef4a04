"""The pipeline's import graph, read from its source: which pipeline modules each module and each
stage include, directly or through others (what dvc.yaml's deps must list)."""

from __future__ import annotations

import ast
import functools

import yaml

from tests.helpers.project import PROJECT

PACKAGE = PROJECT / "pipeline"
STAGES = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]


def module_path(module: str) -> str:
    """pipeline/a/b.py for module a.b (a package: its __init__.py)."""
    path = PACKAGE.joinpath(*module.split("."))
    return str((path / "__init__.py" if path.is_dir() else path.with_suffix(".py")).relative_to(PROJECT))


def packages_of(module: str) -> set[str]:
    """The packages Python runs on the way to `module` (their __init__.py): a.b -> {a}."""
    parts = module.split(".")
    return {".".join(parts[:i]) for i in range(1, len(parts))}


@functools.cache
def imported_modules(module: str) -> frozenset[str]:
    """The pipeline modules `module` imports anywhere in its code (function-level imports run too),
    as dotted names below pipeline (stages.train, data.sources, cli), with the packages they are in."""
    found = set()
    for node in ast.walk(ast.parse((PROJECT / module_path(module)).read_text())):
        if isinstance(node, ast.Import):
            found |= {alias.name.removeprefix("pipeline.") for alias in node.names if alias.name.startswith("pipeline.")}
        elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline"):
            parent = node.module.removeprefix("pipeline").removeprefix(".")
            for alias in node.names:  # a name from a package is a module; from a module, an attribute
                child = f"{parent}.{alias.name}".lstrip(".")
                found.add(child if PACKAGE.joinpath(*child.split(".")).with_suffix(".py").exists() else parent)
    found.discard("")
    return frozenset(found | {p for m in found for p in packages_of(m)})


def module_closure(module: str) -> set[str]:
    """`module` and every pipeline module it imports, directly or through other modules."""
    seen, todo = set(), [module, *packages_of(module)]
    while todo:
        current = todo.pop()
        if current not in seen:
            seen.add(current)
            todo += imported_modules(current)
    return seen


def stage_module(stage: str) -> str:
    return STAGES[stage]["cmd"].removeprefix("python -m pipeline.")


def all_modules() -> set[str]:
    return {".".join(path.relative_to(PACKAGE).with_suffix("").parts).removesuffix(".__init__").removesuffix("__init__")
            for path in PACKAGE.rglob("*.py")} - {""}


def expected_module_deps(stage: str) -> set[str]:
    return {"pipeline/__init__.py"} | {module_path(m) for m in module_closure(stage_module(stage))}


def importers(module_path: str) -> set[str]:
    """The stages whose code includes `module_path` (pipeline/x.py, pipeline/a/b.py)."""
    return {stage for stage in STAGES if module_path in expected_module_deps(stage)}
