"""The project under test and what tests do with it: its paths, copies of it as a fresh clone, its
params shrunk or changed, and the commands a user runs in it."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.config import Params

PROJECT = Path(__file__).resolve().parents[2]
SHARED = Path(os.environ.get("SPLADE_SHARED", PROJECT.parent / "shared"))
# What a fresh clone holds that the pipeline needs to run (no data, models or MLflow store).
PROJECT_FILES = ["pipeline", "flows", "deploy", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore",
                 ".gitignore", "pyproject.toml"]


BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def git(project: Path, *args: str) -> str:
    return subprocess.run(["git", "-c", "user.name=test", "-c", "user.email=test@example.com", *args], cwd=project,
                          capture_output=True, text=True, check=True).stdout


def shrink(params: Params, **train_overrides) -> Params:
    """The quickstart params made tiny: a smaller world, a few training steps. Its 16 evaluation
    queries cannot show a one-epoch student significantly better than its start, so the gate's
    beat-the-start check is off (the gate's own tests keep it on)."""
    data = params.model_dump(by_alias=True)
    data["push"]["gate"]["beat_base"] = False
    data["snapshot"]["synthetic"].update(topics=8, train_queries_per_topic=6, docs_per_topic=3)
    data["train"].update({"epochs": 1, "batch_size": 16, **train_overrides})
    data["train"]["student"].update(vocab_size=500, hidden_size=32)
    return Params.model_validate(data)


# The teacher a user's own triplets name (the lexicon teacher knows only the synthetic world): the
# Hub cross-encoder of recipes/splade-small-msmarco.yaml, for tests that stop before the teacher runs
USER_DATA_TEACHER = {"kind": "cross-encoder", "model": "cross-encoder/ms-marco-MiniLM-L6-v2",
                     "revision": "233902d25c440f23af6f7d6e94d2946bac0bee0a"}


def with_changes(params: Params, **sections) -> Params:
    """`params` with some keys of some sections changed: with_changes(p, push={"gate": {...}})."""
    data = params.model_dump(by_alias=True)

    def merge(into: dict, changes: dict) -> None:
        for key, value in changes.items():
            merge(into[key], value) if isinstance(value, dict) and isinstance(into.get(key), dict) else into.update({key: value})

    merge(data, sections)
    return Params.model_validate(data)


def make_project_copy(dest: Path) -> Path:
    """A fresh clone of the project in `dest`: a git repo with only the committed pipeline files."""
    for name in PROJECT_FILES:
        source = PROJECT / name
        target = dest / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_dir():
            shutil.copytree(source, target, ignore=shutil.ignore_patterns("__pycache__"))
        else:
            shutil.copy(source, target)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "copy"]):
        git(dest, *args)
    return dest


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


def set_params(project: Path, **values) -> None:
    """Edit params.yaml's values as a user would (the flow's round-trip editor keeps the comments)."""
    from flows.retrain import apply_overrides

    apply_overrides([f"{key}={value}" for key, value in values.items()], project / "params.yaml")
