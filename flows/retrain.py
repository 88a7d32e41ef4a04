"""Prefect flow: the DVC pipeline, one task per stage, in the order dvc.yaml gives.

DVC decides what runs: a stage whose code, params and inputs are unchanged is skipped (no Prefect
result caching on top). Run it with `python -m flows.retrain`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections import deque
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task

import pipeline.cli  # noqa: F401  (quiet, telemetry-free environment for the subprocesses too)

DVC_FILE = Path("dvc.yaml")


def stage_names(dvc_file: Path = DVC_FILE) -> list[str]:
    """Stages in the order dvc.yaml lists them (written upstream first)."""
    return list(yaml.safe_load(dvc_file.read_text())["stages"])


@task(name="dvc-stage", task_run_name="{stage}")
def run_stage(stage: str, force: bool = False) -> str:
    """`dvc repro --single-item <stage>`, its output streamed live; returns "ran" or "skipped"."""
    logger = get_run_logger()
    command = ["dvc", "repro", "--single-item", stage] + (["--force"] if force else [])
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line)
    output = "".join(tail)
    if proc.returncode != 0:
        raise RuntimeError(f"stage {stage!r} failed (exit {proc.returncode}):\n{output}")
    outcome = "skipped" if "didn't change, skipping" in output else "ran"
    logger.info("%s: %s", stage, "unchanged, skipped by DVC" if outcome == "skipped" else "ran")
    return outcome


@flow(name="retrain-sparse-encoder")
def retrain(force: bool = False) -> dict[str, str]:
    """Reproduce the pipeline stage by stage; returns {stage: "ran" | "skipped"}."""
    return {stage: run_stage(stage, force=force) for stage in stage_names()}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    args = parser.parse_args(argv)
    outcome = retrain(force=args.force)
    print("stages:", json.dumps(outcome))


if __name__ == "__main__":
    main()
