"""Prefect flow: the DVC pipeline, one task per stage, in the order dvc.yaml gives.

DVC decides what runs: a stage whose code, params and inputs are unchanged is skipped (no Prefect
result caching on top; one `dvc status` up front spares the up-to-date stages a DVC process each).
A stage that fails on something transient (a held DVC lock, a dropped connection, a 5xx from the
Hub) is retried with exponential backoff; any other failure fails the flow run with the stage's
name and the end of its output, and leaves the upstream outputs in place, so a rerun starts at the
failed stage. `overrides` set params as `dvc exp run -S` does (key=value,
validated against the schema before anything runs): params.yaml's values change and nothing else
(comments and layout stay), and the file is restored byte for byte after the run unless
`keep_overrides` (--keep-overrides) says otherwise. `--pull` and `--push` keep data and outputs in
the default DVC remote: `dvc pull` before the stages, `dvc push` after them (only when all passed).

    python -m flows.retrain [--pull] [--push] [--force] [-S train.learning_rate=1e-4 ...] [--keep-overrides]
    python -m flows.retrain --deploy --pool retrain --interval 3600   # to a work pool, then:
    prefect worker start --pool retrain                  # runs the pool's flow runs, from this folder
    python -m flows.retrain --deploy --pool k8s-gpu --image registry/sparse-pipeline:TAG   # Kubernetes

A deployment runs one flow run at a time (concurrency limit 1: a run triggered while another is
running waits for it), so two runs never apply their overrides to the same params.yaml.
"""

from __future__ import annotations

import argparse
import io
import json
import subprocess
from collections import deque
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import yaml
from prefect import flow, get_run_logger, task
from prefect.tasks import exponential_backoff

import pipeline.cli  # noqa: F401  (quiet, telemetry-free environment for the subprocesses too)
from pipeline.config import PARAMS_FILE, Params

DVC_FILE = Path("dvc.yaml")
DEPLOYMENT = "scheduled-retrain"
ENTRYPOINT = "flows/retrain.py:retrain"
# output of a stage worth running again: another process holds DVC's lock, the network dropped
TRANSIENT = ("Unable to acquire lock", "Connection reset", "Connection refused", "timed out",
             "Temporary failure in name resolution", "502 Bad Gateway", "503 Service Unavailable",
             "504 Gateway Timeout", "Could not connect to the endpoint URL")


class StageFailed(RuntimeError):
    """A DVC command that failed: a stage (`what` is its name) or a transfer (`dvc pull`, `dvc push`)."""

    def __init__(self, what: str, code: int, output: str):
        self.stage, self.transient = what, any(marker in output for marker in TRANSIENT)
        name = what if what.startswith("dvc ") else f"stage {what!r}"
        super().__init__(f"{name} failed (exit {code}):\n{output}")


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
def run_stage(stage: str, force: bool = False, up_to_date: bool = False) -> str:
    """`dvc repro --single-item <stage>`, its output streamed live; returns "ran", "skipped" or
    "restored" (from DVC's run cache: the stage ran on exactly these inputs before).
    A stage `dvc status` already found up to date is skipped without asking DVC again."""
    logger = get_run_logger()
    if up_to_date:
        logger.info("%s: up to date (dvc status), skipped", stage)
        return "skipped"
    output = run_dvc(["repro", "--single-item", stage] + (["--force"] if force else []), stage)
    if "didn't change, skipping" in output:
        outcome = "skipped"
    elif "is cached - skipping run" in output:  # DVC's run cache: this stage ran on these inputs before
        outcome = "restored"
    else:
        outcome = "ran"
    logger.info("%s: %s", stage, {"skipped": "unchanged, skipped by DVC", "ran": "ran",
                                  "restored": "outputs restored from DVC's run cache"}[outcome])
    return outcome


def run_dvc(args: list[str], what: str) -> str:
    """`dvc <args>`, its output streamed live; the end of the output, or StageFailed naming `what`."""
    tail: deque[str] = deque(maxlen=40)
    with subprocess.Popen(["dvc", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) as proc:
        for line in proc.stdout:
            print(line, end="", flush=True)
            tail.append(line)
    output = "".join(tail)
    if proc.returncode != 0:
        raise StageFailed(what, proc.returncode, output)
    return output


@task(name="dvc-remote", task_run_name="dvc {direction}", retries=2,
      retry_delay_seconds=exponential_backoff(backoff_factor=5), retry_condition_fn=retry_if_transient)
def sync_remote(direction: str) -> None:
    """`dvc pull` (what the remote holds of this commit's data and outputs; what it lacks is left to
    the stages) or `dvc push` (everything this run made) with the default DVC remote."""
    args = ["pull", "--allow-missing"] if direction == "pull" else ["push"]
    run_dvc(args, f"dvc {direction}")
    get_run_logger().info("dvc %s: done", direction)


def round_trip_yaml():
    """ruamel's round-trip YAML, set up to write params.yaml back as it was read: comments, key
    order, indentation, quotes and `null` kept."""
    from ruamel.yaml import YAML

    yaml_rt = YAML()
    yaml_rt.preserve_quotes = True
    yaml_rt.width = 4096  # never re-wrap a long line
    yaml_rt.indent(mapping=2, sequence=4, offset=2)
    yaml_rt.representer.add_representer(
        type(None), lambda representer, _: representer.represent_scalar("tag:yaml.org,2002:null", "null"))
    return yaml_rt


def apply_overrides(overrides: list[str], params_file: Path = PARAMS_FILE) -> None:
    """`dvc exp run -S key=value` on params.yaml: each dotted key set to the YAML value (a missing key
    is added), the result validated against the params schema before the file is written; the
    rest of the file (comments, layout) is left as it was."""
    from ruamel.yaml import YAML

    yaml_rt = round_trip_yaml()
    data = yaml_rt.load(params_file.read_text())
    for override in overrides:
        key, sep, value = override.partition("=")
        if not sep:
            raise ValueError(f"override {override!r} is not key=value")
        *parents, leaf = key.split(".")
        section = data
        for part in parents:
            if part not in section:
                section[part] = {}
            section = section[part]
        section[leaf] = on_one_line(YAML(typ="safe").load(value))  # YAML 1.2, as dvc reads it: 1e-4 is a number
    text = dump(yaml_rt, data)
    Params.model_validate(YAML(typ="safe").load(text))
    params_file.write_text(text)


def on_one_line(value):
    """A list or mapping written in flow style, as it was given on the command line: [16, 32]."""
    from ruamel.yaml.comments import CommentedMap, CommentedSeq

    if isinstance(value, (list, dict)):
        value = (CommentedSeq if isinstance(value, list) else CommentedMap)(value)
        value.fa.set_flow_style()
    return value


def dump(yaml_rt, data) -> str:
    out = io.StringIO()
    yaml_rt.dump(data, out)
    return out.getvalue()


@contextmanager
def overridden(overrides: list[str], keep: bool, params_file: Path = PARAMS_FILE) -> Iterator[None]:
    """params.yaml with the overrides applied for the duration of a run, then byte for byte as it was
    (unless `keep`): an overridden run leaves nothing behind in the working tree."""
    original = params_file.read_bytes()
    apply_overrides(overrides, params_file)
    try:
        yield
    finally:
        if not keep:
            params_file.write_bytes(original)


def stale_stages() -> set[str] | None:
    """The stages `dvc status` reports out of date; None when it cannot tell (then each stage asks
    DVC itself)."""
    done = subprocess.run(["dvc", "status", "--json"], capture_output=True, text=True)
    try:
        return {name.rsplit(":", 1)[-1] for name in json.loads(done.stdout)} if done.returncode == 0 else None
    except json.JSONDecodeError:
        return None


@flow(name="retrain-sparse-encoder")
def retrain(force: bool = False, overrides: list[str] | None = None, keep_overrides: bool = False,
            pull: bool = False, push: bool = False) -> dict[str, str]:
    """Reproduce the pipeline stage by stage; returns {stage: "ran" | "skipped" | "restored"}. With `pull`, `dvc
    pull` first (a stage whose outputs the remote holds is then up to date); with `push`, `dvc push`
    last, only after every stage succeeded (a failed run pushes nothing). One `dvc status` before
    the stages: those before the first out-of-date one (dvc.yaml lists them upstream first) are up
    to date and need no DVC process each, so a run with nothing to do takes seconds."""
    outcome = {}
    with overridden(overrides or [], keep_overrides):
        if pull:
            sync_remote("pull")
        stages = stage_names()
        stale = None if force else stale_stages()
        first = next((i for i, stage in enumerate(stages) if stale is None or stage in stale), len(stages))
        for i, stage in enumerate(stages):
            outcome[stage] = run_stage(stage, force=force, up_to_date=i < first)
        if push:
            sync_remote("push")
    return outcome


def deploy_to_pool(pool: str, parameters: dict, schedule: dict, image: str | None = None) -> None:
    """The flow deployed to `pool`, one flow run at a time. Without an image, from this folder (a
    worker on this machine, or one that sees the same path, runs it here; a missing pool is created
    as a process pool); with one, from that image (its working directory the repository), for a
    Kubernetes pool made with deploy/kubernetes/base-job-template.json."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(pool)
        except ObjectNotFound:
            if image:
                raise SystemExit(f"no work pool {pool!r}: create it with `prefect work-pool create {pool} --type "
                                 "kubernetes --base-job-template deploy/kubernetes/base-job-template.json`") from None
            client.create_work_pool(WorkPoolCreate(name=pool, type="process"))
            print(f"work pool {pool!r} created (process)")
    deployable = retrain if image else retrain.from_source(source=str(Path.cwd()), entrypoint=ENTRYPOINT)
    deployable.deploy(name=DEPLOYMENT, work_pool_name=pool, parameters=parameters, concurrency_limit=1,
                      print_next_steps=False, **({"image": image, "build": False, "push": False} if image else {}),
                      **schedule)
    print(f"deployment retrain-sparse-encoder/{DEPLOYMENT} on pool {pool!r}: start a worker with "
          f"`prefect worker start --pool {pool}`")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--force", action="store_true", help="re-run every stage")
    parser.add_argument("-S", "--set-param", dest="overrides", action="append", default=[],
                        help="key=value, as dvc exp run -S (repeatable); params.yaml is restored afterwards")
    parser.add_argument("--keep-overrides", action="store_true",
                        help="leave the -S values in params.yaml after the run")
    parser.add_argument("--pull", action="store_true", help="dvc pull from the default DVC remote first")
    parser.add_argument("--push", action="store_true", help="dvc push to the default DVC remote after a successful run")
    parser.add_argument("--deploy", action="store_true", help="deploy to the work pool --pool names (its workers run it)")
    parser.add_argument("--pool", help="the work pool (with --deploy); a missing one is created as a process pool")
    parser.add_argument("--image", help="with --deploy: the image a Kubernetes pool's pods run (the project installed)")
    when = parser.add_mutually_exclusive_group()
    when.add_argument("--cron", help="the deployment's schedule (default: 0 3 * * *)")
    when.add_argument("--interval", type=float, help="the deployment's schedule: a run every this many seconds")
    args = parser.parse_args(argv)
    if args.deploy and not args.pool:
        parser.error("--deploy needs --pool")
    if args.deploy:
        schedule = {"interval": args.interval} if args.interval else {"cron": args.cron or "0 3 * * *"}
        deploy_to_pool(args.pool, {"force": args.force, "overrides": args.overrides, "keep_overrides": args.keep_overrides,
                                   "pull": args.pull, "push": args.push}, schedule, args.image)
        return
    outcome = retrain(force=args.force, overrides=args.overrides, keep_overrides=args.keep_overrides,
                      pull=args.pull, push=args.push)
    print("stages:", json.dumps(outcome))


if __name__ == "__main__":
    main()
