"""The push stage with the real huggingface_hub client against a local stand-in for the Hub."""

from __future__ import annotations

import json
import logging

import pytest

from pipeline import push
from pipeline.cli import StageError
from pipeline.config import CARD_DIR, EVAL_METRICS, PUSH_PLAN, SNAPSHOT_MANIFEST, STUDENT_DIR, PushConfig, load_params
from pipeline.gate import GateRefused
from pipeline.tracking import evaluation_identity, write_json
from tests.conftest import PROJECT
from tests.hub_standin import HubStandIn

SECRET = "hf_standin_secret_7f3a9c"  # a token value the tests look for everywhere afterwards


@pytest.fixture
def hub(monkeypatch):
    from huggingface_hub import constants

    standin = HubStandIn()
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # the tests run offline; the stand-in is local
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


def built_model(ndcg: float, base: float = 0.3, eval_sha256: str = "e" * 64) -> None:
    """A model folder, its card, its evaluation and the snapshot manifest, where the stages leave them."""
    (STUDENT_DIR / "1_SpladePooling").mkdir(parents=True, exist_ok=True)
    (STUDENT_DIR / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    (STUDENT_DIR / "config.json").write_text('{"model_type": "bert"}')
    (STUDENT_DIR / "1_SpladePooling" / "config.json").write_text('{"pooling_strategy": "max"}')
    write_json(SNAPSHOT_MANIFEST, manifest(eval_sha256))
    write_json(EVAL_METRICS, {"student": {"dot_ndcg@10": ndcg}, "base": {"dot_ndcg@10": base},
                              "bm25": {"dot_ndcg@10": 0.4}, "datasets": {"scifact": {}}})
    CARD_DIR.mkdir(parents=True, exist_ok=True)
    (CARD_DIR / "README.md").write_text(card_text(ndcg, evaluation_identity(manifest(eval_sha256))["id"]))
    (CARD_DIR / "training_curve.png").write_bytes(b"\x89PNG fake")


def params_for(**push_settings):
    params = load_params(PROJECT / "params.yaml")
    return params.model_copy(update={"push": PushConfig(repo_id="tester/sparse", backoff_seconds=0.01,
                                                         **push_settings)})


def test_all_files_arrive_in_one_commit_after_a_503_is_retried(workdir, hub, caplog):
    """A 503 on the commit (huggingface_hub retries that itself) and on creating the repo (the
    stage's retries, with backoff): one commit holds every file."""
    built_model(0.6)
    hub.fail.update(commit=1, create=1)
    with caplog.at_level(logging.WARNING):
        plan = push.run(params_for(dry_run=False))

    (commit,) = hub.repos["tester/sparse"].branches["main"]
    assert commit.oid == plan["commit"] and hub.repos["tester/sparse"].private
    expected = {f["path"] for f in plan["files"]}
    assert sorted(commit.added) == sorted(expected) == sorted(
        ["README.md", "model.safetensors", "config.json", "1_SpladePooling/config.json", "training_curve.png"])
    assert commit.files["model.safetensors"] == (STUDENT_DIR / "model.safetensors").read_bytes()
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
    with pytest.raises(GateRefused, match=r"0\.5500, 0\.0500 below the pushed model's 0\.6000 \(push.gate.max_drop 0.01\) "
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


def test_no_token_no_push(workdir, hub, monkeypatch):
    built_model(0.6)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(StageError, match="HF_TOKEN is not set"):
        push.run(params_for(dry_run=False))
    assert not hub.repos and not hub.requests
