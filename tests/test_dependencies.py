"""Every library the project imports directly is a declared dependency: one that arrives only through
another package can vanish with that package's next release."""

import ast
import re
import sys
import tomllib
from importlib import metadata

from tests.helpers.project import PROJECT

LOCAL = {"pipeline", "flows", "tests", "bench"} | {path.stem for path in (PROJECT / "bench").glob("*.py")}


def imported_libraries(*folders: str) -> dict[str, set[str]]:
    """Top-level names imported anywhere in the folders' code (function-level imports too) that are
    neither the standard library nor the project's own, each with the files importing it."""
    found: dict[str, set[str]] = {}
    for folder in folders:
        for path in (PROJECT / folder).rglob("*.py"):
            for node in ast.walk(ast.parse(path.read_text())):
                names = ([alias.name for alias in node.names] if isinstance(node, ast.Import)
                         else [node.module] if isinstance(node, ast.ImportFrom) and node.level == 0 else [])
                for name in names:
                    top = name.split(".")[0]
                    if top not in sys.stdlib_module_names and top not in LOCAL:
                        found.setdefault(top, set()).add(str(path.relative_to(PROJECT)))
    return found


def normalized(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def declared(*extras: str) -> set[str]:
    """Distribution names in pyproject's dependencies and the given extras."""
    project = tomllib.loads((PROJECT / "pyproject.toml").read_text())["project"]
    requirements = project["dependencies"] + [r for extra in extras for r in project["optional-dependencies"][extra]]
    return {normalized(re.split(r"[\[<>=!~ ;]", r, maxsplit=1)[0]) for r in requirements}


def undeclared(imports: dict[str, set[str]], names: set[str]) -> dict[str, list[str]]:
    distributions = metadata.packages_distributions()
    return {module: sorted(files) for module, files in imports.items()
            if not {normalized(d) for d in distributions.get(module, [module])} & names}


def test_the_pipeline_imports_only_declared_dependencies():
    missing = undeclared(imported_libraries("pipeline", "flows"), declared("scale", "server", "kubernetes", "ray"))
    assert not missing, f"imported but not declared in pyproject's dependencies: {missing}"


def test_tests_and_benches_import_only_declared_dependencies():
    missing = undeclared(imported_libraries("tests", "bench"), declared("scale", "server", "kubernetes", "ray", "dev"))
    assert not missing, f"imported but not declared in pyproject (dependencies or the dev extra): {missing}"


def test_a_removed_declaration_is_found():
    names = declared("scale", "server") - {"scipy"}
    assert "scipy" in undeclared(imported_libraries("pipeline"), names)


def test_the_local_backend_never_imports_ray():
    """Ray is an extra (teacher.backend / evaluate.backend ray): the stages and their library code load
    without it, and never import it unless asked."""
    import subprocess
    import sys

    probe = ("import sys; import pipeline.stages.teacher, pipeline.stages.evaluate, pipeline.modelling.teachers, "
             "pipeline.evaluation.scoring; print('ray' in sys.modules)")
    assert subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout == "False\n"
