"""The docs' commands and code examples: each fenced bash or python block in README.md and docs/
carries a marker on the line before it, `<!-- example: ... -->`, saying who runs it:

- `run`: this module runs it, here, as written;
- `ci`: `.ci/run` runs it verbatim (the README's set-up commands);
- test ids, `tests/test_x.py::test_y, ...`: those tests run it (each test must exist, and every
  command word and option of the block must be in their module's source);
- `needs hub`, `needs gpu`, `needs cluster`: it needs what CI does not have (the Hugging Face Hub,
  a GPU, several machines), and says so on the page.

A block without a marker, or with a marker that names a missing test, fails."""

from __future__ import annotations

import ast
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.helpers.project import ENV, PROJECT

PAGES = [PROJECT / "README.md", *sorted((PROJECT / "docs").glob("**/*.md"))]
BLOCK = re.compile(r"(?:<!-- example: (?P<marker>[^>]*?) -->\n)?```(?P<language>bash|python)\n(?P<code>.*?)```",
                   re.DOTALL)
NEEDS = {"needs hub", "needs gpu", "needs cluster"}


@dataclass(frozen=True)
class Example:
    page: Path
    line: int
    language: str
    code: str
    marker: str | None

    def __str__(self) -> str:
        return f"{self.page.relative_to(PROJECT)}:{self.line}"


def examples() -> list[Example]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for match in BLOCK.finditer(text):
            line = text.count("\n", 0, match.start("language")) + 1
            found.append(Example(page, line, match["language"], match["code"], match["marker"]))
    return found


def commands(code: str) -> list[list[str]]:
    """The bash block's commands as words: comments dropped, continuations joined, `&&` split."""
    joined = code.replace("\\\n", " ")
    lines = [line.split(" #")[0].strip() for line in joined.splitlines() if not line.lstrip().startswith("#")]
    return [shlex.split(part) for line in lines if line for part in line.split("&&") if part.strip()]


def significant_words(words: list[str]) -> list[str]:
    """What a test must also say to run the command: subcommands, modules and options; not the
    program's name, nor values a user picks (paths, numbers, key=value)."""
    if words[:1] == ["."]:
        return []
    words = [w for w in words[1:] if not re.fullmatch(r"[A-Z_]+=.*", w)]
    return [w.split("=")[0] for w in words if not re.search(r"[/~\"' \[]|^\d|^\.\.?$|^-m$|\.(jsonl?|ya?ml|tsv|csv|parquet)$", w)
            and not re.fullmatch(r"[\w.-]+=[^=]+", w) or w.startswith("--")]


def named_tests(marker: str) -> list[str]:
    return [part.strip() for part in marker.split(",") if "::" in part]


def imported_as_module(word: str, source: str) -> bool:
    """`python -m a.b.c` run in-process: the test imports c from a.b and calls it."""
    parent, _, leaf = word.rpartition(".")
    return bool(parent) and f"from {parent} import" in source and re.search(rf"\b{leaf}\.(main|run)\(", source) is not None


def defined_tests(path: Path) -> set[str]:
    return {node.name for node in ast.parse(path.read_text()).body if isinstance(node, ast.FunctionDef)}


def test_every_example_says_who_runs_it():
    found = examples()
    assert len(found) >= 15
    for example in found:
        marker = example.marker
        assert marker, f"{example}: a {example.language} block without `<!-- example: ... -->`"
        assert marker in {"run", "ci"} | NEEDS or named_tests(marker), f"{example}: unknown marker {marker!r}"


@pytest.mark.parametrize("example", [e for e in examples() if e.marker and named_tests(e.marker)], ids=str)
def test_the_tests_an_example_names_exist_and_run_its_commands(example):
    sources = []
    for test_id in named_tests(example.marker):
        file, name = test_id.split("::")
        assert (PROJECT / file).is_file() and name in defined_tests(PROJECT / file), f"{example}: no {test_id}"
        sources.append((PROJECT / file).read_text())
    # what the tests run through tests/helpers/ (the services' command lines) counts as theirs
    source = "\n".join(sources + [path.read_text() for path in sorted((PROJECT / "tests/helpers").glob("*.py"))])
    if example.language == "bash":
        for words in commands(example.code):
            missing = [w for w in significant_words(words) if w not in source and not imported_as_module(w, source)]
            assert not missing, f"{example}: {' '.join(words)!r}: {missing} not in {named_tests(example.marker)}"
    else:  # python: every call it makes
        calls = {node.func.attr if isinstance(node.func, ast.Attribute) else getattr(node.func, "id", "")
                 for node in ast.walk(ast.parse(example.code)) if isinstance(node, ast.Call)}
        missing = sorted(c for c in calls - {"open", "print"} if c not in source)
        assert not missing, f"{example}: {missing} not in {named_tests(example.marker)}"


def test_the_ci_examples_are_what_ci_runs():
    ci = [" ".join(words) for words in commands((PROJECT / ".ci/run").read_text())]
    for example in (e for e in examples() if e.marker == "ci"):
        for words in commands(example.code):
            assert any(" ".join(words) in line for line in ci), f"{example}: {' '.join(words)!r} is not in .ci/run"


@pytest.mark.parametrize("example", [e for e in examples() if e.marker == "run"], ids=str)
def test_the_run_examples_run(example, shared, tmp_path):
    """Run from the project root, so that ../shared resolves as the docs say; what they write goes
    to a temporary folder (their output paths are relative)."""
    script = example.code.replace("../shared", str(shared))
    language = ["bash", "-e", "-c"] if example.language == "bash" else [sys.executable, "-c"]
    done = subprocess.run([*language, script], cwd=tmp_path, env={**ENV, "PYTHONPATH": str(PROJECT)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{example}: {done.stdout[-2000:]}{done.stderr[-2000:]}"
