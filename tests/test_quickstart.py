"""The README's main job on a fresh copy of the project: `dvc repro` of the quickstart profile.

Checks the issue's acceptance: the student learns (gain over its untrained start), the trained model
loads in a fresh process and ranks training positives first, a no-op repro is quick and runs nothing,
a training param re-runs only train and what follows, and the Prefect flow completes.
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


def test_a_training_param_reruns_train_and_what_follows_only(project):
    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["train"]["epochs"] = 2
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    output, seconds = run([str(BIN / "dvc"), "repro"], project)
    print(f"\nrepro after a train param change: {seconds:.1f} s")
    assert stages_run(output) == {"train", "evaluate", "card", "push", "track"}


def test_prefect_flow_runs_the_pipeline_to_a_completed_flow_run(project):
    params_file = project / "params.yaml"
    params = yaml.safe_load(params_file.read_text())
    params["card"]["model_name"] = "quickstart under prefect"
    params_file.write_text(yaml.safe_dump(params, sort_keys=False))
    output, seconds = run([sys.executable, "-m", "flows.retrain"], project)
    print(f"\nprefect flow: {seconds:.1f} s")
    assert "Finished in state Completed()" in output
    outcome = json.loads(re.search(r"^stages: (.*)$", output, re.M).group(1))
    assert {s for s, o in outcome.items() if o == "ran"} == {"card", "push", "track"}
    assert "quickstart under prefect" in (project / "build/card/README.md").read_text()


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
