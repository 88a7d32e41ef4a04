"""The README's main job on a fresh copy of the project: `dvc repro` of the quickstart profile.

Checks: the student learns (gain over its untrained start), the trained model loads in a fresh
process and ranks training positives first, a no-op repro is quick and runs nothing, `dvc exp run`
sweeps of a training param re-run only train and what follows and compare in MLflow, the Prefect
flow runs from a scheduled deployment on a real server and fails naming a failed stage, and a push
to a Hub stand-in leaks no token.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.conftest import make_project_copy

BIN = Path(sys.executable).parent
ENV = {**os.environ, "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}"}


def run(command: list[str], cwd: Path, timeout: int = 600) -> tuple[str, float]:
    started = time.perf_counter()
    done = subprocess.run(command, cwd=cwd, env=ENV, capture_output=True, text=True, timeout=timeout)
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-5000:]
    return output, time.perf_counter() - started


def stages_run(output: str) -> set[str]:
    return set(re.findall(r"Running stage '([\w-]+)'", output))


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    repo = make_project_copy(tmp_path_factory.mktemp("quickstart"))
    output, seconds = run([str(BIN / "dvc"), "repro"], repo)
    print(f"\nquickstart dvc repro: {seconds:.1f} s")
    assert stages_run(output) == {"snapshot", "validate", "teacher", "train", "evaluate", "card",
                                  "push", "track"}
    return repo


def test_student_learns_far_beyond_its_untrained_start(project):
    metrics = json.loads((project / "metrics/eval.json").read_text())
    teacher = json.loads((project / "records/teacher.json").read_text())["metrics"]
    trained, untrained = metrics["student"]["dot_ndcg@10"], metrics["base"]["dot_ndcg@10"]
    print(f"\nnDCG@10 untrained {untrained:.4f} trained {trained:.4f} "
          f"teacher {teacher['eval_dot_ndcg@10']:.4f}")
    assert trained - untrained >= 0.2
    assert teacher["eval_dot_ndcg@10"] > trained - 0.05  # the student learns from a teacher that knows


def test_dvc_shows_the_evaluation_metrics_and_plots(project):
    output, _ = run([str(BIN / "dvc"), "metrics", "show", "--json"], project)
    shown = json.loads(output)
    metrics = next(iter(shown.values()))["data"]["metrics/eval.json"]["data"]
    on_file = json.loads((project / "metrics/eval.json").read_text())
    assert metrics["student"]["dot_ndcg@10"] == on_file["student"]["dot_ndcg@10"]
    assert {"student", "base", "bm25"} <= set(metrics["datasets"]["synthetic"])
    for figure in ("ndcg_per_dataset.png", "document_active_dims.png"):
        assert (project / "metrics/plots" / figure).read_bytes()[:4] == b"\x89PNG"


def test_trained_model_loads_in_a_fresh_process_and_ranks_positives_first(project):
    script = """
import json, sys
import pandas as pd
from sentence_transformers import SparseEncoder
model = SparseEncoder("models/student")
train = pd.read_parquet("data/snapshot/train.parquet")
q = model.encode_query(train["query"].tolist(), convert_to_sparse_tensor=True)
p = model.encode_document(train["positive"].tolist(), convert_to_sparse_tensor=True)
n = model.encode_document(train["negative"].tolist(), convert_to_sparse_tensor=True)
assert q.is_sparse and p.is_sparse
pos = (q * p).to_dense().sum(-1)
neg = (q * n).to_dense().sum(-1)
print("RESULT", json.dumps({"accuracy": float((pos > neg).float().mean()), "triplets": len(train)}))
"""
    output, _ = run([sys.executable, "-c", script], project)
    result = json.loads(re.search(r"^RESULT (.*)$", output, re.M).group(1))
    print(f"\ntriplets ranked right in a fresh process: {result}")
    assert result["accuracy"] >= 0.9


def test_second_repro_runs_nothing_quickly(project):
    output, seconds = run([str(BIN / "dvc"), "repro"], project)
    print(f"\nno-op dvc repro: {seconds:.2f} s")
    assert stages_run(output) == set()
    assert seconds <= 10


def exp_run(project, rate: float) -> None:
    output, seconds = run([str(BIN / "dvc"), "exp", "run", "-S", f"train.learning_rate={rate}"], project)
    print(f"\ndvc exp run, learning rate {rate}: {seconds:.1f} s")
    assert stages_run(output) == {"train", "evaluate", "card", "push", "track"}


def pipeline_runs(project) -> list:
    """The project's pipeline runs in MLflow (not the nested stage runs), newest first."""
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{project}/mlflow.db")
    return [r for r in mlflow.search_runs(experiment_names=["sparse-encoder"], output_format="list")
            if "mlflow.parentRunId" not in r.data.tags]


def assert_comparable(first, second) -> None:
    assert first.data.params["train.learning_rate"] != second.data.params["train.learning_rate"]
    assert set(first.data.metrics) == set(second.data.metrics) and "evaluate.dot_ndcg_at_10" in first.data.metrics
    assert first.data.tags["dvc_lock"] != second.data.tags["dvc_lock"]


def test_a_dvc_exp_run_reruns_train_onwards_and_compares_in_mlflow(project):
    """`dvc exp run -S train.learning_rate=...` re-runs train and what follows only, and its MLflow
    run has the same metric columns as the first run's."""
    exp_run(project, 0.001)
    newest, *_, first = pipeline_runs(project)
    assert float(newest.data.params["train.learning_rate"]) == 0.001
    assert_comparable(newest, first)


@pytest.mark.slow
def test_a_sweep_of_two_dvc_exp_runs_compares_in_mlflow(project):
    """A sweep: two `dvc exp run -S` points with different learning rates, side by side in MLflow."""
    for rate in (0.0005, 0.002):
        exp_run(project, rate)
    newest, previous = pipeline_runs(project)[:2]
    assert [float(r.data.params["train.learning_rate"]) for r in (previous, newest)] == [0.0005, 0.002]
    assert_comparable(newest, previous)


def free_port() -> int:
    import socket

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def wait_for(url: str, seconds: int = 180) -> None:
    import urllib.request

    deadline = time.monotonic() + seconds
    while True:
        try:
            urllib.request.urlopen(url, timeout=2)
            return
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(1)


DEPLOYMENT_RUN = """
import asyncio, json
from prefect.client.orchestration import get_client
from prefect.deployments import run_deployment

async def schedules():
    async with get_client() as client:
        for _ in range(120):
            try:
                deployment = await client.read_deployment_by_name("retrain-sparse-encoder/scheduled-retrain")
                return [s.schedule.cron for s in deployment.schedules]
            except Exception:
                await asyncio.sleep(1)

print("SCHEDULES", json.dumps(asyncio.run(schedules())))
flow_run = run_deployment("retrain-sparse-encoder/scheduled-retrain", timeout=600)
print("STATE", flow_run.state.type.value)
"""


def test_prefect_server_a_scheduled_deployment_and_a_failed_stage(project, tmp_path):
    """Against a real `prefect server` on 127.0.0.1: a deployment served with a cron schedule is
    registered and a run triggered from it completes. Then a stage failure (the push gate, set out of
    reach) leaves the flow run Failed naming the stage, the upstream outputs as they were, and the
    rerun starts at that stage."""
    import hashlib
    import signal

    port = free_port()
    env = {**ENV, "PREFECT_API_URL": f"http://127.0.0.1:{port}/api", "PREFECT_HOME": str(tmp_path / "prefect")}
    server = subprocess.Popen([str(BIN / "prefect"), "server", "start", "--host", "127.0.0.1", "--port", str(port)],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    served = None
    try:
        wait_for(f"http://127.0.0.1:{port}/api/health")
        served = subprocess.Popen([sys.executable, "-m", "flows.retrain", "--serve", "--cron", "0 3 * * *"],
                                  cwd=project, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                  start_new_session=True)
        done = subprocess.run([sys.executable, "-c", DEPLOYMENT_RUN], cwd=project, env=env, capture_output=True,
                              text=True, timeout=900)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        assert json.loads(re.search(r"^SCHEDULES (.*)$", done.stdout, re.M).group(1)) == ["0 3 * * *"]
        assert re.search(r"^STATE COMPLETED$", done.stdout, re.M), done.stdout[-2000:]

        upstream = {path: hashlib.sha256(path.read_bytes()).hexdigest()
                    for folder in ("models/student", "metrics", "build/card")
                    for path in sorted((project / folder).rglob("*")) if path.is_file()}
        failed = subprocess.run([sys.executable, "-m", "flows.retrain", "-S", "push.gate.minimum=0.999"],
                                cwd=project, env=env, capture_output=True, text=True, timeout=900)
        output = failed.stdout + failed.stderr
        assert failed.returncode != 0 and "stage 'push' failed" in output and "push.gate.minimum 0.9990" in output
        assert re.search(r"Finished in state Failed\(.*stage 'push' failed", output), output[-3000:]
        assert upstream == {path: hashlib.sha256(path.read_bytes()).hexdigest() for path in upstream}

        output, _ = run([sys.executable, "-m", "flows.retrain", "-S", "push.gate.minimum=null"], project)
        outcome = json.loads(re.search(r"^stages: (.*)$", output, re.M).group(1))
        assert {s for s, o in outcome.items() if o == "ran"} == {"push", "track"}
    finally:
        for process in (served, server):
            if process:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=60)


def test_push_to_a_hub_stand_in_leaks_no_token_and_the_gate_stops_a_regression(project):
    """`dvc repro` with push.dry_run false and HF_TOKEN set, against a local stand-in for the Hub:
    one commit with every file, its message carrying the git SHA and the dvc.lock hash; the token's
    value is in no file of the project (mlruns/, mlflow.db, the card, records, DVC outputs and
    cache) nor in the output. Then a gate the model cannot pass stops the push, naming both numbers."""
    from tests.hub_standin import HubStandIn
    from tests.test_push import SECRET

    hub = HubStandIn()
    env = {**ENV, "HF_TOKEN": SECRET, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0"}
    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["push"].update(dry_run=False, repo_id="tester/quickstart")
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        done = subprocess.run([str(BIN / "dvc"), "repro"], cwd=project, env=env, capture_output=True, text=True)
        output = done.stdout + done.stderr
        assert done.returncode == 0, output[-5000:]
        assert stages_run(output) == {"card", "push", "track"}  # the card names the repo
        (commit,) = hub.repos["tester/quickstart"].branches["main"]
        plan = json.loads((project / "build/push_plan.json").read_text())
        assert commit.oid == plan["commit"] and sorted(commit.added) == sorted(f["path"] for f in plan["files"])
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=project, capture_output=True,
                             text=True).stdout.strip()
        assert f"git {sha}, dvc.lock " in commit.message and "dvc.lock none" not in commit.message

        leaks = [str(path.relative_to(project)) for path in project.rglob("*")
                 if path.is_file() and SECRET.encode() in path.read_bytes()]
        assert leaks == [] and SECRET not in output
        assert any(path.is_file() for path in (project / "mlruns").rglob("*"))  # the scan saw the store

        params["push"]["gate"] = {"metric": "dot_ndcg@10", "minimum": 0.999, "max_drop": 0.01}
        params_file.write_text(yaml.safe_dump(params, sort_keys=False))
        done = subprocess.run([str(BIN / "dvc"), "repro"], cwd=project, env=env, capture_output=True, text=True)
        assert done.returncode != 0
        value = json.loads((project / "metrics/eval.json").read_text())["student"]["dot_ndcg@10"]
        assert f"is {value:.4f}, below push.gate.minimum 0.9990; not pushing" in done.stdout + done.stderr
        assert len(hub.repos["tester/quickstart"].branches["main"]) == 1
    finally:
        hub.close()
