"""The push stage with the real huggingface_hub client against a local stand-in for the Hub."""

from __future__ import annotations

import json
import logging

import numpy as np
import pandas as pd
import pytest

from pipeline.cli import StageError
from pipeline.config import (
    CARD_DIR,
    EVAL_METRICS,
    EXPORT_DIR,
    HEADLINE,
    PER_QUERY,
    PUSH_PLAN,
    SNAPSHOT_EVAL,
    SNAPSHOT_MANIFEST,
    STUDENT_DIR,
    PushConfig,
    load_params,
)
from pipeline.evaluation.gate import GateRefused
from pipeline.evaluation.stats import Resampling
from pipeline.stages import evaluate, push
from pipeline.tracking.records import evaluation_identity, write_atomically, write_json
from tests.helpers.hub_standin import SECRET, HubStandIn
from tests.helpers.project import PROJECT


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    standin = HubStandIn()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests run offline; the stand-in is local
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # binaries over LFS: the stand-in speaks no Xet
    monkeypatch.setenv("HF_ENDPOINT", standin.url)
    monkeypatch.setenv("HF_TOKEN", SECRET)
    yield standin
    standin.close()


def manifest(eval_sha256: str) -> dict:
    return {"train": {"sha256": "t" * 64},
            "eval": {"source": "../shared/data/beir/scifact", "revision": None, "split": "test",
                     "sets": {"scifact": {"docs": 5183}}, "sha256": eval_sha256}}


def card_text(value: float, eval_id: str, dataset: str = "scifact") -> str:
    from huggingface_hub import EvalResult, ModelCardData

    data = ModelCardData(model_name="m", eval_results=[EvalResult(
        task_type="sparse-information-retrieval", dataset_type=dataset, dataset_name=dataset,
        dataset_args={"eval_id": eval_id}, metric_type="dot_ndcg@10", metric_value=value)])
    return f"---\n{data.to_yaml()}\n---\n\n# m\n"


def eval_snapshot(queries: int) -> None:
    """The evaluation set where the snapshot leaves it: the push reads its query texts."""
    from pipeline.data.snapshots import write_eval_set
    from pipeline.data.sources import RetrievalSet

    write_eval_set(RetrievalSet({f"d{i}": f"doc {i}" for i in range(queries)},
                                {f"q{i}": f"query {i}" for i in range(queries)},
                                {f"q{i}": {f"d{i}": 1} for i in range(queries)}), SNAPSHOT_EVAL / "scifact")


def built_model(ndcg: float, base: float = 0.3, eval_sha256: str = "e" * 64, queries: int = 40,
                jitter: int | None = None) -> None:
    """A model folder, its card, its evaluation (means, per-query values around them, intervals) and
    the snapshot, where the stages leave them. With `jitter` (a seed), the student's per-query values
    scatter (sd 0.3, mean unchanged) as another training's would."""
    (STUDENT_DIR / "1_SpladePooling").mkdir(parents=True, exist_ok=True)
    (STUDENT_DIR / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    (STUDENT_DIR / "config.json").write_text('{"model_type": "bert"}')
    (STUDENT_DIR / "1_SpladePooling" / "config.json").write_text('{"pooling_strategy": "max"}')
    (EXPORT_DIR / "onnx").mkdir(parents=True, exist_ok=True)
    for name in ("model.onnx", "model_qint8.onnx"):
        (EXPORT_DIR / "onnx" / name).write_bytes(b"\x08\x07\x12\x07pytorch" + bytes(range(256)) * 64 + name.encode())
    write_json(SNAPSHOT_MANIFEST, manifest(eval_sha256))
    eval_snapshot(queries)
    spread = np.tile([0.2, -0.2], queries // 2)  # per-query values of exactly the given mean
    scatter = np.zeros(queries)
    if jitter is not None:
        scatter = np.random.default_rng(jitter).normal(0, 0.3, queries)
        scatter -= scatter.mean()
    table = pd.DataFrame([{"model": model, "dataset": "scifact", "query_id": f"q{i}",
                           **{metric: mean + spread[i] + (scatter[i] if model == "student" else 0)
                              for metric in HEADLINE}}
                          for model, mean in (("student", ndcg), ("base", base), ("bm25", 0.4))
                          for i in range(queries)])
    write_atomically(PER_QUERY, lambda tmp: table.to_csv(tmp, index=False))
    spreads, differences = evaluate.intervals(table, Resampling())
    write_json(EVAL_METRICS, {"student": {"dot_ndcg@10": ndcg}, "base": {"dot_ndcg@10": base},
                              "bm25": {"dot_ndcg@10": 0.4}, "datasets": {"scifact": {}}, "queries": queries,
                              "intervals": spreads, "differences": differences})
    CARD_DIR.mkdir(parents=True, exist_ok=True)
    (CARD_DIR / "README.md").write_text(card_text(ndcg, evaluation_identity(manifest(eval_sha256))["id"]))
    (CARD_DIR / "training_curve.png").write_bytes(b"\x89PNG fake")


def params_for(**push_settings):
    """The project's params with these push settings; the gate's rule threshold (the Hub card's
    comparison) unless a test names another."""
    params = load_params(PROJECT / "params.yaml")
    gate = {"rule": "threshold", **push_settings.pop("gate", {})}
    return params.model_copy(update={"push": PushConfig(repo_id="tester/sparse", backoff_seconds=0.01,
                                                         gate=gate, **push_settings)})


def test_all_files_arrive_in_one_commit_after_a_503_is_retried(workdir, hub, caplog):
    """A 503 on the commit and on an LFS object's upload (huggingface_hub retries those itself) and
    on creating the repo (the stage's retries, with backoff): one commit holds every file, the binaries
    (weights, ONNX, the figure) as LFS objects."""
    built_model(0.6)
    hub.fail.update({"commit": 1, "create": 1, "lfs-upload": 1})
    with caplog.at_level(logging.WARNING):
        plan = push.run(params_for(dry_run=False))

    (commit,) = hub.repos["tester/sparse"].branches["main"]
    assert commit.oid == plan["commit"] and hub.repos["tester/sparse"].private
    expected = {f["path"] for f in plan["files"]}
    assert sorted(commit.added) == sorted(expected) == sorted(
        ["README.md", "model.safetensors", "config.json", "1_SpladePooling/config.json", "training_curve.png",
         "onnx/model.onnx", "onnx/model_qint8.onnx"])
    assert sorted(commit.lfs) == ["model.safetensors", "onnx/model.onnx", "onnx/model_qint8.onnx", "training_curve.png"]
    assert commit.files["model.safetensors"] == (STUDENT_DIR / "model.safetensors").read_bytes()
    assert commit.files["onnx/model_qint8.onnx"] == (EXPORT_DIR / "onnx/model_qint8.onnx").read_bytes()
    lfs_puts = [path for method, path, _ in hub.requests if method == "PUT"]
    assert len(lfs_puts) == 5 and len(set(lfs_puts)) == 4  # each object once, one of them again after its 503
    assert commit.message.startswith("Upload ") and "dvc.lock" in commit.message and "git " in commit.message
    assert "create_repo failed (HfHubHTTPError: Server error '503" in caplog.text and "retry 1 of 4" in caplog.text
    commits_tried = [r for r in hub.requests if r[1].endswith("/commit/main")]
    assert len(commits_tried) == 2  # the 503, then the commit
    assert {auth for _, _, auth in hub.requests if auth} == {f"Bearer {SECRET}"}
    assert plan["gate"]["value"] == 0.6 and plan["gate"]["previous"] is None  # a first push

    # a second model to another branch: created from main, main untouched
    built_model(0.61)
    push.run(params_for(dry_run=False, revision="experiment"))
    repo = hub.repos["tester/sparse"]
    assert len(repo.branches["main"]) == 1 and len(repo.branches["experiment"]) == 2
    assert repo.branches["experiment"][-1].added == ["README.md"]  # unchanged files are not re-sent


def test_the_gate_refuses_a_regression_a_low_score_and_no_gain_over_the_untrained_start(workdir, hub):
    built_model(0.6)
    push.run(params_for(dry_run=False))
    built_model(0.55)
    with pytest.raises(GateRefused, match=r"threshold\): dot_ndcg@10 on scifact is 0\.5500, 0\.0500 below the pushed model's 0\.6000 \(push.gate.max_drop 0.01\) "
                                          r"\(BM25: 0\.4000\); not pushing"):
        push.run(params_for(dry_run=False))
    assert len(hub.repos["tester/sparse"].branches["main"]) == 1  # nothing pushed
    refused = json.loads(PUSH_PLAN.read_text())  # the plan says why
    assert refused["gate"]["passed"] is False and "0.0500 below" in refused["gate"]["reason"]
    assert refused["commit"] is None and refused["previous"]["compared"]
    built_model(0.595)  # within max_drop: pushed
    plan = push.run(params_for(dry_run=False))
    assert plan["gate"]["previous"] == 0.6 and len(hub.repos["tester/sparse"].branches["main"]) == 2
    with pytest.raises(GateRefused, match=r"is 0\.5950, below push.gate.minimum 0\.7000"):
        push.run(params_for(gate={"minimum": 0.7}))  # a dry run checks the minimum too
    built_model(0.25, base=0.3)  # worse than where it started
    with pytest.raises(GateRefused, match=r"is 0\.2500, not above the untrained model it started from, 0\.3000 "
                                          r"\(push.gate.beat_base\) \(BM25: 0\.4000\)"):
        push.run(params_for())
    assert push.run(params_for(gate={"beat_base": False}))["gate"]["passed"]  # the param turns it off


def test_a_pushed_model_from_another_evaluation_is_reported_not_compared(workdir, hub):
    """A card on the branch measured on another evaluation (other content, so another id) does not
    block a lower number on this one: the plan names it, uncompared."""
    built_model(0.9, eval_sha256="a" * 64)
    push.run(params_for(dry_run=False))
    built_model(0.5, eval_sha256="b" * 64)
    plan = push.run(params_for(dry_run=False))
    assert len(hub.repos["tester/sparse"].branches["main"]) == 2 and plan["gate"]["previous"] is None
    assert not plan["previous"]["compared"] and plan["previous"]["value"] == 0.9
    assert "not compared" in plan["previous"]["reason"]
    with pytest.raises(StageError, match="push.gate.metric 'dot_ndgc@10' is not among the evaluation's metrics"):
        push.run(params_for(gate={"metric": "dot_ndgc@10"}))


def registered_champion(tracking_uri: str, name: str) -> str:
    """The model built last as the registry's champion of its evaluation: a run holding its metric and
    per-query values, a version of `name` from it, and the alias champion-<eval id>."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri)
    experiment = client.create_experiment("champions")
    run = client.create_run(experiment)
    client.log_metric(run.info.run_id, "evaluate.dot_ndcg_at_10", json.loads(EVAL_METRICS.read_text())["student"]["dot_ndcg@10"])
    client.log_artifact(run.info.run_id, str(PER_QUERY))
    client.set_terminated(run.info.run_id)
    client.create_registered_model(name)
    version = str(client.create_model_version(name, f"runs:/{run.info.run_id}/model", run.info.run_id).version)
    eval_id = evaluation_identity(json.loads(SNAPSHOT_MANIFEST.read_text()))["id"]
    client.set_registered_model_alias(name, f"champion-{eval_id}", version)
    return version


def test_under_significance_the_push_compares_with_the_registry_champion_per_query(workdir):
    """push.gate.rule significance: the champion is the registry's champion of this evaluation, its
    per-query values read from its own MLflow run. A model 0.01 below it with scattered per-query
    values is pushed (not significantly worse); one 0.15 below is refused, the plan naming the test,
    the difference, its interval and p-value, and the queries that lost most, with their texts."""
    from pipeline.config import TrackingConfig

    uri = f"sqlite:///{workdir}/mlflow.db"
    base_params = params_for(gate={"rule": "significance"})
    params = base_params.model_copy(update={"tracking": TrackingConfig(tracking_uri=uri, registered_model="m")})
    built_model(0.60)
    version = registered_champion(uri, "m")

    built_model(0.59, jitter=1)
    plan = push.run(params)
    verdict = plan["gate"]
    assert verdict["passed"] and verdict["champion_version"] == version and verdict["previous"] == pytest.approx(0.60)
    assert verdict["vs_champion"]["difference"] == pytest.approx(-0.01)
    assert verdict["vs_champion"]["p_less"] >= 0.05 and "not significantly below champion version 1" in verdict["reason"]
    assert plan["intervals"]["student"]["dot_ndcg@10"]["queries"] == 40

    built_model(0.45)
    with pytest.raises(GateRefused, match=r"significantly below champion version 1's 0\.6000: difference -0\.1500 "
                                          r"\[-0\.1500, -0\.1500\] \(95% interval, 40 queries\), one-sided paired "
                                          r"randomization test .* p = [\d.e-]+ < push.gate.alpha 0.05"):
        push.run(params)
    refused = json.loads(PUSH_PLAN.read_text())["gate"]
    assert not refused["passed"] and refused["vs_champion"]["p_less"] < 0.05
    lost = refused["movers"]["lost"]
    assert len(lost) == 5 and lost[0]["query"] == f"query {lost[0]['query_id'][1:]}"
    assert lost[0]["difference"] == pytest.approx(-0.15)


def test_no_token_no_push(workdir, hub, monkeypatch):
    built_model(0.6)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(StageError, match="HF_TOKEN is not set"):
        push.run(params_for(dry_run=False))
    assert not hub.repos and not hub.requests
