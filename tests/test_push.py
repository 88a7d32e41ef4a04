"""The push stage with the real huggingface_hub client against a local stand-in for the Hub."""

from __future__ import annotations

import logging

import pytest

from pipeline import push
from pipeline.cli import StageError
from pipeline.config import CARD_DIR, STUDENT_DIR, PushConfig, load_params
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


def card_text(value: float, dataset: str = "scifact") -> str:
    from huggingface_hub import EvalResult, ModelCardData

    data = ModelCardData(model_name="m", eval_results=[EvalResult(
        task_type="sparse-information-retrieval", dataset_type=dataset, dataset_name=dataset,
        metric_type="dot_ndcg@10", metric_value=value)])
    return f"---\n{data.to_yaml()}\n---\n\n# m\n"


def built_model(ndcg: float) -> None:
    """A model folder and its card, where the stages leave them."""
    (STUDENT_DIR / "1_SpladePooling").mkdir(parents=True, exist_ok=True)
    (STUDENT_DIR / "model.safetensors").write_bytes(bytes(range(256)) * 4096)
    (STUDENT_DIR / "config.json").write_text('{"model_type": "bert"}')
    (STUDENT_DIR / "1_SpladePooling" / "config.json").write_text('{"pooling_strategy": "max"}')
    CARD_DIR.mkdir(parents=True, exist_ok=True)
    (CARD_DIR / "README.md").write_text(card_text(ndcg))
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


def test_the_gate_refuses_a_regression_and_a_low_score_giving_both_numbers(workdir, hub):
    built_model(0.6)
    push.run(params_for(dry_run=False))
    built_model(0.55)
    with pytest.raises(StageError, match=r"0\.5500, 0\.0500 below the pushed model's 0\.6000 \(push.gate.max_drop 0.01\)"):
        push.run(params_for(dry_run=False))
    assert len(hub.repos["tester/sparse"].branches["main"]) == 1  # nothing pushed
    built_model(0.595)  # within max_drop: pushed
    plan = push.run(params_for(dry_run=False))
    assert plan["gate"]["previous"] == 0.6 and len(hub.repos["tester/sparse"].branches["main"]) == 2
    with pytest.raises(StageError, match=r"is 0\.5950, below push.gate.minimum 0\.7000"):
        push.run(params_for(gate={"minimum": 0.7}))  # a dry run checks the minimum too


def test_no_token_no_push(workdir, hub, monkeypatch):
    built_model(0.6)
    monkeypatch.delenv("HF_TOKEN")
    with pytest.raises(StageError, match="HF_TOKEN is not set"):
        push.run(params_for(dry_run=False))
    assert not hub.repos and not hub.requests
