"""Prefect flow: the DVC pipeline, one task per stage, in the order dvc.yaml gives.

DVC decides what runs: a stage whose code, params and inputs are unchanged is skipped (no Prefect
result caching on top). A stage that fails on something transient (a held DVC lock, a dropped
connection, a 5xx from the Hub) is retried with exponential backoff; any other failure fails the flow
run with the stage's name and the end of its output, and leaves the upstream outputs in place, so a
rerun starts at the failed stage. `overrides` set params as `dvc exp run -S` does (key=value, in
params.yaml, validated against the schema before anything runs).

    python -m flows.retrain [--force] [-S train.learning_rate=1e-4 ...]
    python -m flows.retrain --serve --cron "0 3 * * *"   # a scheduled deployment, served from here
"""

from __future__ import annotations

import argparse
import json
import subprocess
from collections import deque
from pathlib import Path

import yaml
from prefect import flow, get_run_logger, task
from prefect.tasks import exponential_backoff

import pipeline.cli  # noqa: F401  (quiet, telemetry-free environment for the subprocesses too)
from pipeline.config import PARAMS_FILE, Params

DVC_FILE = Path("dvc.yaml")
DEPLOYMENT = "scheduled-retrain"
# output of a stage worth running again: another process holds DVC's lock, the network dropped
TRANSIENT = ("Unable to acquire lock", "Connection reset", "Connection refused", "timed out",
             "Temporary failure in name resolution", "502 Bad Gateway", "503 Service Unavailable",
             "504 Gateway Timeout")


class StageFailed(RuntimeError):
    def __init__(self, stage: str, code: int, output: str):
        self.stage, self.transient = stage, any(marker in output for marker in TRANSIENT)
        super().__init__(f"stage {stage!r} failed (exit {code}):\n{output}")


def stage_names(dvc_file: Path = DVC_FILE) -> list[str]:
    """Stages in the order dvc.yaml lists them (written upstream first)."""
    return list(yaml.safe_load(dvc_file.read_text())["stages"])


def retry_if_transient(task, task_run, state) -> bool:
    try:
        state.result()
    except StageFailed as failure:
        return failure.transient
    except Exception:
        return False
    return False


@task(name="dvc-stage", task_run_name="{stage}", retries=3,
      retry_delay_seconds=exponential_backoff(backoff_factor=10), retry_condition_fn=retry_if_transient)
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
        raise StageFailed(stage, proc.returncode, output)
    outcome = "skipped" if "didn't change, skipping" in output else "ran"
    logger.info("%s: %s", stage, "unchanged, skipped by DVC" if outcome == "skipped" else "ran")
    return outcome


def apply_overrides(overrides: list[str], params_file: Path = PARAMS_FILE) -> None:
    """`dvc exp run -S key=value` on params.yaml: each dotted key set to the YAML value, and the
    result validated against the params schema before the file is written."""
    data = yaml.safe_load(params_file.read_text())
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r} is not key=value")
        *parents, leaf = key.split(".")
        section = data
        for part in parents:
            section = section.setdefault(part, {})
        parsed = yaml.safe_load(value)
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-4 as text; dvc's YAML 1.2, as a number
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        section[leaf] = parsed
    Params.model_validate(data)
    params_file.write_text(yaml.safe_dump(data, sort_keys=False))


@flow(name="retrain-sparse-encoder")
def retrain(force: bool = False, overrides: list[str] | None = None) -> dict[str, str]:
    """Reproduce the pipeline stage by stage; returns {stage: "ran" | "skipped"}."""
    if overrides:
        apply_overrides(overrides)
    outcome = {}
    for stage in stage_names():
        outcome[stage] = run_stage(stage, force=force)
    return outcome


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[],
                        help="key=value, as dvc exp run -S (repeatable)")
    parser.add_argument("--serve", action="store_true", help="serve a deployment on a schedule")
    parser.add_argument("--cron", default="0 3 * * *", help="the deployment's schedule (with --serve)")
    args = parser.parse_args(argv)
    if args.serve:
        retrain.serve(name=DEPLOYMENT, cron=args.cron, parameters={"force": args.force, "overrides": args.overrides})
        return
    outcome = retrain(force=args.force, overrides=args.overrides)
    print("stages:", json.dumps(outcome))


if __name__ == "__main__":
    main()
