"""The retraining loop on real infrastructure (pytest -m lifecycle): PostgreSQL, an S3 API server and an
MLflow server on them (PostgreSQL backend store, artifacts in S3), started on 127.0.0.1 by the
module's fixture; a DVC remote on the S3 server; the project's git remote a bare repository.

Clone A runs the pipeline (tiny params), commits and pushes data and outputs; a second machine (a
fresh clone, empty cache) pulls, finds everything up to date and retrains after a param change; both
runs land in one experiment and the registry's aliases follow the gate. The champion loads in a
process that cannot import this project. The CI workflow's steps run as a script against these
services. Faults: the MLflow server killed during track, the S3 server down during `dvc push`,
PostgreSQL restarted during a sweep: nothing lost, no run twice.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from pipeline.config import load_params
from tests.helpers.project import (
    BIN,
    ENV,
    git,
    make_project_copy,
    set_params,
    stages_run,
    with_changes,
)
from tests.helpers.services import MlflowServer, Postgres, S3Server

pytestmark = pytest.mark.lifecycle

ALL_STAGES = {"inputs", "snapshot", "validate", "teacher", "train", "export", "evaluate", "card", "push", "track"}
RETRAINED = {"train", "export", "evaluate", "card", "push", "track"}
# the quickstart made tiny (as tests.conftest.shrink does), so each run takes about a minute; a
# student this small barely learns, so the gate does not ask it to beat its untrained start (that
# rule is tested in test_pipeline and test_quickstart); its other rules hold
TINY = {"snapshot.synthetic.topics": 8, "snapshot.synthetic.train_queries_per_topic": 6,
        "snapshot.synthetic.docs_per_topic": 3, "train.epochs": 1, "train.batch_size": 16,
        "train.student.vocab_size": 500, "train.student.hidden_size": 32, "push.gate.beat_base": False}
DVC_REMOTE = "s3://dvc/store"
WORKFLOW = Path(__file__).resolve().parents[1] / ".github/workflows/retrain.yml"


def sh(command: list[str], cwd: Path, env: dict, check: bool = True, timeout: int = 900) -> subprocess.CompletedProcess:
    done = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert done.returncode == 0, f"{command}: {(done.stdout + done.stderr)[-5000:]}"
    return done


def output(done: subprocess.CompletedProcess) -> str:
    return done.stdout + done.stderr


@pytest.fixture(scope="module")
def services(tmp_path_factory):
    folder = tmp_path_factory.mktemp("services")
    postgres = Postgres()
    s3 = S3Server(folder, ["dvc", "mlflow"])
    server = MlflowServer(folder, postgres, s3, "mlflow")
    try:
        started = time.perf_counter()
        s3.start()
        server.start()
        print(f"\nservices up in {time.perf_counter() - started:.1f} s: PostgreSQL :{postgres.port}, "
              f"S3 {s3.url}, MLflow {server.url}")
        yield SimpleNamespace(postgres=postgres, s3=s3, mlflow=server, folder=folder)
    finally:
        server.stop()
        s3.stop()
        postgres.close()


def client_env(services) -> dict:
    """A machine's environment: the S3 credentials and endpoint, and the shared MLflow server."""
    return {**ENV, **services.s3.client_env(), "MLFLOW_TRACKING_URI": services.mlflow.url,
            "PREFECT_HOME": str(services.folder / "prefect")}


def mlflow_client(services):
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=services.mlflow.url, registry_uri=services.mlflow.url)


def pipeline_runs(services, experiment: str) -> list:
    """The experiment's pipeline runs (not their nested stage runs), oldest first."""
    client = mlflow_client(services)
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    runs = client.search_runs([found.experiment_id], max_results=1000, order_by=["attributes.start_time ASC"])
    return [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


@pytest.fixture(scope="module")
def origin(tmp_path_factory, services):
    """Clone A after its first run: tiny params and the DVC remote committed, the run's dvc.lock and
    metrics committed, its data and outputs pushed to the DVC remote, all pushed to the project's git
    remote (a bare repository)."""
    a = make_project_copy(tmp_path_factory.mktemp("clone-a"))
    env = client_env(services)
    git(a, "branch", "-M", "main")
    set_params(a, **TINY)
    sh([str(BIN / "dvc"), "remote", "add", "-d", "storage", DVC_REMOTE], a, env)
    git(a, "commit", "-qam", "tiny params; the DVC remote")
    started = time.perf_counter()
    done = sh([str(BIN / "dvc"), "repro"], a, env)
    print(f"\nclone A: dvc repro {time.perf_counter() - started:.1f} s")
    assert stages_run(output(done)) == ALL_STAGES
    git(a, "add", "-A")
    git(a, "commit", "-qm", "run 1")
    pushed = sh([str(BIN / "dvc"), "push"], a, env)
    print(f"clone A: {pushed.stdout.strip().splitlines()[-1]}")
    bare = tmp_path_factory.mktemp("origin") / "project.git"
    subprocess.run(["git", "clone", "-q", "--bare", str(a), str(bare)], check=True)
    git(a, "remote", "add", "origin", str(bare))
    git(a, "fetch", "-q", "origin")
    return SimpleNamespace(a=a, url=bare, params=load_params(a / "params.yaml"))


@pytest.fixture(scope="module")
def clone_b(origin, tmp_path_factory):
    """The second machine: a fresh clone in a new folder, with an empty DVC cache."""
    b = tmp_path_factory.mktemp("machine-b") / "project"
    subprocess.run(["git", "clone", "-q", str(origin.url), str(b)], check=True)
    assert not (b / ".dvc/cache").exists() and not (b / "models").exists()
    return b


def test_a_second_machine_pulls_the_run_and_retrains_only_what_a_change_affects(origin, clone_b, services):
    """B pulls: `dvc status` is clean and `dvc repro` runs nothing. A changed train value in B re-runs
    train onwards only. Both runs are in one experiment with the same metric columns; the registry
    holds both versions; under the significance gate the rerun with another seed, not significantly
    worse, takes the champion alias of the evaluation (no seed's luck refuses it)."""
    env = client_env(services)
    pulled = sh([str(BIN / "dvc"), "pull"], clone_b, env)
    print(f"\nclone B: {pulled.stdout.strip().splitlines()[-1]}")
    assert json.loads(sh([str(BIN / "dvc"), "status", "--json"], clone_b, env).stdout) == {}
    assert stages_run(output(sh([str(BIN / "dvc"), "repro"], clone_b, env))) == set()
    assert (clone_b / "models/student/model.safetensors").exists()

    set_params(clone_b, **{"train.seed": 1})
    started = time.perf_counter()
    done = sh([str(BIN / "dvc"), "repro"], clone_b, env)
    print(f"clone B after train.seed=1: dvc repro {time.perf_counter() - started:.1f} s")
    assert stages_run(output(done)) == RETRAINED

    params = origin.params
    first, second = pipeline_runs(services, params.tracking.experiment)
    assert first.data.params["train.seed"] == "0" and second.data.params["train.seed"] == "1"
    assert set(first.data.metrics) == set(second.data.metrics) and "evaluate.dot_ndcg_at_10" in first.data.metrics
    assert first.data.tags["outcome"] == second.data.tags["outcome"] == "ok"

    client = mlflow_client(services)
    name = params.tracking.registered_model
    versions = {v.version: v.run_id for v in client.search_model_versions(f"name = '{name}'")}
    assert versions == {"1": first.info.run_id, "2": second.info.run_id}
    # the gate's verdict, against the first run's per-query values read from its MLflow run
    old, new = (r.data.metrics["evaluate.dot_ndcg_at_10"] for r in (first, second))
    recorded = json.loads((clone_b / "records/mlflow_run.json").read_text())["registered"]
    drop = recorded["verdict"]["vs_champion"]
    print(f"nDCG@10 run 1 {old:.4f}, run 2 {new:.4f}: difference {drop['difference']:+.4f} "
          f"[{drop['low']:+.4f}, {drop['high']:+.4f}], p(worse) {drop['p_less']:.3f}")
    assert recorded["verdict"]["rule"] == "significance" and drop["p_less"] >= params.push.gate.alpha
    assert recorded["promoted"] and recorded["version"] == "2" and recorded["champion_version"] == "1"
    assert client.get_model_version_by_alias(name, recorded["alias"]).version == "2"
    assert client.get_model_version_by_alias(name, "challenger").version == "2"
    assert second.data.tags["gate.passed"] == "true" and "p = " in second.data.tags["gate.vs_champion"]
    assert first.data.tags["eval.id"] == second.data.tags["eval.id"]


ISOLATED_LOAD = """
import importlib.util, json, sys
sys.path.append(sys.argv[1])  # the installed libraries only: no .pth file runs, so no editable project
assert importlib.util.find_spec("pipeline") is None, "this process can import the project"
import mlflow
model = mlflow.pyfunc.load_model(sys.argv[2])
print("VECTOR", json.dumps(model.predict([sys.argv[3]], params={"side": "query"})[0]))
"""


def test_the_champion_loads_and_encodes_in_a_process_that_cannot_import_the_project(origin, clone_b, services,
                                                                                   tmp_path):
    """models:/<name>@champion-<eval id>, logged as models-from-code (no pickle in it), loads with
    mlflow and sentence-transformers alone and encodes a query as SparseEncoder.encode_query does,
    within 1e-6."""
    import mlflow
    import pandas as pd
    from sentence_transformers import SparseEncoder

    name = origin.params.tracking.registered_model
    alias = json.loads((origin.a / "records/mlflow_run.json").read_text())["registered"]["alias"]
    champion = mlflow_client(services).get_model_version_by_alias(name, alias)
    (clone,) = [c for c in (origin.a, clone_b)
                if json.loads((c / "records/mlflow_run.json").read_text())["run_id"] == champion.run_id]
    query = pd.read_parquet(clone / "data/snapshot/train.parquet")["query"].iloc[0]

    mlflow.set_tracking_uri(services.mlflow.url)
    files = Path(mlflow.artifacts.download_artifacts(f"models:/{name}@{alias}", dst_path=str(tmp_path / "model")))
    logged = yaml.safe_load((files / "MLmodel").read_text())["flavors"]["python_function"]
    assert logged["model_code_path"].endswith("sparse_encoder_model.py")
    assert not list(files.rglob("*.pkl")) and "import pipeline" not in (files / logged["model_code_path"]).read_text()

    env = {key: value for key, value in ENV.items() if key not in ("PYTHONPATH",)}
    done = sh([sys.executable, "-I", "-S", "-c", ISOLATED_LOAD, sysconfig.get_paths()["purelib"],
               f"models:/{name}@{alias}", query], tmp_path, {**env, "MLFLOW_TRACKING_URI": services.mlflow.url})
    loaded = json.loads(re.search(r"^VECTOR (.*)$", done.stdout, re.M).group(1))
    expected = SparseEncoder(str(clone / "models/student")).encode_query([query]).coalesce()
    want = dict(zip(expected.indices()[1].tolist(), expected.values().tolist()))
    got = dict(zip(loaded["indices"], loaded["values"]))
    print(f"\nchampion version {champion.version}: {len(got)} active dimensions in a process without the project")
    assert set(got) == set(want) and len(got) > 0
    assert max(abs(got[i] - want[i]) for i in want) <= 1e-6


def workflow_steps() -> tuple[dict, list[dict]]:
    job = yaml.safe_load(WORKFLOW.read_text())["jobs"]["retrain"]
    return job.get("env", {}), job["steps"]


def resolve(value: str, secrets: dict) -> str:
    """A workflow expression as GitHub resolves it: a missing secret is the empty string."""
    value = re.sub(r"\$\{\{\s*secrets\.(\w+)\s*\}\}", lambda m: secrets.get(m.group(1), ""), str(value))
    value = re.sub(r"\$\{\{\s*github\.token\s*\}\}", "ghs_lifecycle-test", value)
    assert "${{" not in value, value
    return value


GH_STANDIN = """#!/usr/bin/env bash
# stand-in for GitHub's CLI (no GitHub here): records the pull request it is asked to open
printf '%s\\n' "$@" > "$GH_RECORD/args"
while [ $# -gt 0 ]; do [ "$1" = --body-file ] && cp "$2" "$GH_RECORD/body.md"; shift; done
"""


def test_the_ci_workflow_steps_run_as_a_script_against_the_services(origin, services, tmp_path):
    """The workflow's `run:` steps in order (each in a fresh bash, as Actions runs them; the install
    step is the README's, which .ci/run runs itself), with the secrets' names set to the local
    services, on a clone whose last commit changed a train value: it pulls the last run from the DVC
    remote (so only train onwards runs), tracks in the MLflow server, pushes to the DVC remote, and
    commits dvc.lock and metrics to a branch with a pull request whose text is the metrics diff
    against main, the intervals and the gate's verdict against the champion."""
    c = tmp_path / "runner"
    subprocess.run(["git", "clone", "-q", str(origin.url), str(c)], check=True)
    (c / ".venv").symlink_to(sys.prefix)
    set_params(c, **{"train.seed": 2})
    git(c, "commit", "-qam", "retrain with seed 2")
    git(c, "push", "-q", "origin", "main")
    standin = tmp_path / "bin"
    standin.mkdir()
    (standin / "gh").write_text(GH_STANDIN)
    (standin / "gh").chmod(0o755)
    (tmp_path / "gh").mkdir()

    secrets = {"MLFLOW_TRACKING_URI": services.mlflow.url, "DVC_REMOTE_URL": DVC_REMOTE,
               "DVC_REMOTE_ENDPOINT": services.s3.url, "AWS_ACCESS_KEY_ID": services.s3.client_env()["AWS_ACCESS_KEY_ID"],
               "AWS_SECRET_ACCESS_KEY": services.s3.client_env()["AWS_SECRET_ACCESS_KEY"],
               "HF_TOKEN": "hf_lifecycle-test-token"}
    runner = {key: value for key, value in ENV.items() if not key.startswith(("AWS_", "MLFLOW_TRACKING"))}
    runner.update(PATH=f"{standin}{os.pathsep}{runner['PATH']}", GITHUB_RUN_ID="4242", GH_RECORD=str(tmp_path / "gh"),
                  GITHUB_STEP_SUMMARY=str(tmp_path / "summary.md"), PREFECT_HOME=str(tmp_path / "prefect"))
    job_env, steps = workflow_steps()
    runs_before = len(pipeline_runs(services, origin.params.tracking.experiment))
    logs = []
    for step in steps:
        if "run" not in step or "pip install" in step["run"]:
            continue
        env = {**runner, **{k: resolve(v, secrets) for k, v in {**job_env, **step.get("env", {})}.items()}}
        started = time.perf_counter()
        done = sh(["bash", "--noprofile", "--norc", "-eo", "pipefail", "-c", step["run"]], c, env)
        logs.append(output(done))
        print(f"\nworkflow step {step['name']!r}: {time.perf_counter() - started:.1f} s")
    assert stages_run("".join(logs)) == RETRAINED  # the rest came from the DVC remote

    report = (tmp_path / "summary.md").read_text()
    new = json.loads((c / "metrics/eval.json").read_text())["student"]["dot_ndcg@10"]
    old = json.loads(git(c, "show", "origin/main:metrics/eval.json"))["student"]["dot_ndcg@10"]
    row = next(line for line in report.splitlines() if "student.dot_ndcg@10" in line)
    print(f"metrics diff row: {row}")
    assert f"{old:.5f}".rstrip("0") in row and f"{new:.5f}".rstrip("0") in row
    assert (tmp_path / "gh/body.md").read_text() in report
    # the intervals and the gate's verdict against the champion, with the queries that moved most
    verdict = json.loads((c / "build/push_plan.json").read_text())["gate"]
    student = json.loads((c / "metrics/eval.json").read_text())["intervals"]["student"]["dot_ndcg@10"]
    assert f"| dot_ndcg@10 | {student['value']:.4f} [{student['low']:.4f}, {student['high']:.4f}] |" in report
    assert f"**Gate (significance): passed.** {verdict['reason']}" in report
    assert f"Against champion version {verdict['champion_version']} (" in report
    assert "Gained most against the champion:" in report and "Lost most against the champion:" in report
    args = (tmp_path / "gh/args").read_text().split("\n")
    assert args[:2] == ["pr", "create"] and "retrain/4242" in args and "main" in args
    committed = subprocess.run(["git", "--git-dir", str(origin.url), "show", "retrain/4242:dvc.lock"],
                               capture_output=True, text=True, check=True).stdout
    assert committed == (c / "dvc.lock").read_text()
    assert json.loads(sh([str(BIN / "dvc"), "status", "--cloud", "--json"], c,
                         {**ENV, **services.s3.client_env()}).stdout) == {}  # every output in the remote
    assert len(pipeline_runs(services, origin.params.tracking.experiment)) == runs_before + 1


def test_mlflow_server_killed_during_track_fails_naming_it_and_the_rerun_logs_one_run(origin, services):
    """The server is killed while track is logging: track fails within its bounded retries, naming the
    server. Back up, a rerun logs the pipeline run once (the cut-short attempt replaced, not kept
    beside it) and registers one version."""
    a, env = origin.a, client_env(services)
    experiment = "lifecycle-track-fault"
    set_params(a, **{"tracking.experiment": experiment})
    client = mlflow_client(services)
    name = origin.params.tracking.registered_model
    versions_before = len(client.search_model_versions(f"name = '{name}'"))
    track = subprocess.Popen([str(BIN / "dvc"), "repro"], cwd=a, env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.STDOUT, text=True)
    while not [r for r in pipeline_runs(services, experiment) if r.info.status == "RUNNING"]:
        assert track.poll() is None, "track ended before the server could be killed"
        time.sleep(0.1)
    services.mlflow.stop()
    killed = time.perf_counter()
    out, _ = track.communicate(timeout=600)
    print(f"\ntrack failed {time.perf_counter() - killed:.1f} s after the server was killed")
    assert track.returncode != 0 and stages_run(out) == {"track"}
    assert f"the MLflow server {services.mlflow.url} does not answer" in out
    assert time.perf_counter() - killed < 120

    services.mlflow.start()
    assert stages_run(output(sh([str(BIN / "dvc"), "repro"], a, env))) == {"track"}
    (run,) = pipeline_runs(services, experiment)
    assert run.info.status == "FINISHED" and run.data.tags["outcome"] == "ok"
    assert len(client.search_model_versions(f"name = '{name}'")) == versions_before + 1


def flow(project: Path, env: dict, *args: str) -> subprocess.CompletedProcess:
    started = time.perf_counter()
    done = sh([sys.executable, "-m", "flows.retrain", *args], project, env, check=False)
    print(f"\nflows.retrain {' '.join(args)}: exit {done.returncode}, {time.perf_counter() - started:.1f} s")
    return done


def test_s3_down_during_dvc_push_is_a_clear_error_and_the_rerun_completes(origin, services):
    """Clone A's flow with --push, its DVC remote on a second S3 server: a run that a stage fails
    pushes nothing; with the S3 server down, `dvc push` fails the flow naming the endpoint; back up,
    the rerun (`--pull --push`, as the docs give it) pushes everything (`dvc status --cloud` clean)."""
    import boto3

    a = origin.a
    spare = S3Server(services.folder, ["dvc"])
    env = {**client_env(services), "AWS_ENDPOINT_URL_S3": spare.url}

    def objects() -> int:
        s3 = boto3.client("s3", endpoint_url=spare.url, region_name="us-east-1",
                          aws_access_key_id=env["AWS_ACCESS_KEY_ID"], aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        return s3.list_objects_v2(Bucket="dvc").get("KeyCount", 0)

    try:
        spare.start()
        failed = flow(a, env, "--push", "-S", "push.gate.minimum=0.999")
        assert failed.returncode != 0 and "stage 'push' failed" in output(failed)
        assert objects() == 0  # a failed run pushes nothing

        spare.stop()
        down = flow(a, env, "--push")
        assert down.returncode != 0
        assert "dvc push failed" in output(down) and f"Could not connect to the endpoint URL: \"{spare.url}" in output(down)

        spare.start()  # an empty bucket again (moto keeps nothing): --pull finds nothing and lets it be
        done = flow(a, env, "--pull", "--push")
        assert done.returncode == 0, output(done)[-3000:]
        assert objects() > 0
        assert json.loads(sh([str(BIN / "dvc"), "status", "--cloud", "--json"], a, env).stdout) == {}
    finally:
        spare.stop()


def test_postgres_restarted_mid_sweep_loses_no_run(origin, services, monkeypatch):
    """A sweep of four tracked runs into the server; PostgreSQL stops and starts again while the second
    is being logged: all four runs are in MLflow once each, finished, and registered."""
    from pipeline.stages import track

    monkeypatch.chdir(origin.a)
    experiment = "lifecycle-sweep"
    base = with_changes(load_params(origin.a / "params.yaml"),
                        tracking={"experiment": experiment, "tracking_uri": services.mlflow.url})
    rates = [0.0001, 0.0002, 0.0003, 0.0004]
    spans, errors = [], []

    def sweep():
        try:
            for rate in rates:
                started = time.monotonic()
                track.run(with_changes(base, train={"learning_rate": rate}))
                spans.append((started, time.monotonic()))
        except Exception as error:
            errors.append(error)

    worker = threading.Thread(target=sweep)
    worker.start()
    while not spans and worker.is_alive():
        time.sleep(0.05)
    time.sleep(0.3)  # the second point is logging
    outage = time.monotonic()
    services.postgres.stop()
    time.sleep(2)
    services.postgres.start()
    back = time.monotonic()
    worker.join(timeout=600)
    assert not errors, errors
    assert any(start < back and end > outage for start, end in spans[1:]), "no point was being logged during the outage"
    runs = pipeline_runs(services, experiment)
    assert sorted(float(r.data.params["train.learning_rate"]) for r in runs) == rates
    assert all(r.info.status == "FINISHED" and r.data.tags["outcome"] == "ok" for r in runs)
    client = mlflow_client(services)
    registered = {v.run_id for v in client.search_model_versions(f"name = '{base.tracking.registered_model}'")}
    assert {r.info.run_id for r in runs} <= registered
    print(f"\nsweep: {len(runs)} runs, PostgreSQL down {back - outage:.1f} s during point 2")
