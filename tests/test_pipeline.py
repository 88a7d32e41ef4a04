"""All stages in-process on the shrunken quickstart (once for the module), then the MLflow run they
leave behind; a run the gate refuses or a stage fails; the registry's champions per evaluation."""

import contextlib
import hashlib
import json
import os
import re
import shutil

import mlflow
import numpy as np
import pytest
from sentence_transformers import SparseEncoder

from pipeline.cli import StageError
from pipeline.config import (
    CARD_DIR,
    EVAL_METRICS,
    PUSH_DIR,
    PUSH_PLAN,
    RECORDED_STAGES,
    RECORDS_DIR,
    SNAPSHOT_MANIFEST,
    SNAPSHOT_TRAIN,
    STUDENT_DIR,
    Params,
    load_params,
)
from pipeline.evaluation.gate import GateRefused
from pipeline.stages import (
    card,
    evaluate,
    export,
    inputs,
    push,
    snapshot,
    teacher,
    track,
    train,
    validate,
)
from tests.helpers.browser import mlflow_compare_view
from tests.helpers.project import PROJECT, shrink, with_changes

EVAL_STEPS = 4
STAGES = (inputs, snapshot, validate, teacher, train, export, evaluate, card, push)


def assert_nested_stage_runs(runs, parent) -> None:
    """A nested run per stage under `parent`, with the stage's own params and metrics, tagged as it is."""
    children = {r.data.tags["stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert set(children) == set(RECORDED_STAGES)
    for stage, child in children.items():
        assert child.data.tags["git_revision"] == parent.data.tags["git_revision"]
        assert child.data.tags["dvc_lock"] == parent.data.tags["dvc_lock"]
        assert child.data.metrics["seconds"] == parent.data.metrics[f"{stage}.seconds"] > 0
        assert child.data.params and all(k.startswith(f"{stage}.") for k in child.data.params)
        record = json.loads((RECORDS_DIR / f"{stage}.json").read_text())  # the stage's own time, not track's
        assert (child.info.start_time, child.info.end_time) == (int(record["started_at"] * 1000),
                                                                int(record["finished_at"] * 1000))
    assert children["evaluate"].data.metrics["dot_ndcg_at_10"] == parent.data.metrics["evaluate.dot_ndcg_at_10"]
    # the pipeline run spans its stages, from the first one's start (they ran back to back) to track's end
    assert parent.info.start_time == min(child.info.start_time for child in children.values())
    assert parent.info.end_time >= max(child.info.end_time for child in children.values())
    assert parent.info.end_time - parent.info.start_time >= 1000 * sum(
        parent.data.metrics[f"{stage}.seconds"] for stage in children)


@pytest.fixture(scope="module")
def tiny_params(workdir) -> Params:
    # an absolute store: MLflow keeps one store per URI, so a relative sqlite:///mlflow.db would reach
    # the file of whichever working folder used that URI first in this process
    return with_changes(shrink(load_params(PROJECT / "params.yaml")), train={"eval_steps": EVAL_STEPS},
                        tracking={"tracking_uri": f"sqlite:///{workdir}/mlflow.db"})


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """One working folder for the module's pipeline run (stages write relative to it)."""
    return tmp_path_factory.mktemp("pipeline")


@pytest.fixture(autouse=True)
def in_workdir(workdir, monkeypatch):
    """Each test of this module in the module's folder, and only it: in a random order a test of
    another module can run between two of these, and must not find itself there."""
    monkeypatch.chdir(workdir)


def in_a_copy(workdir, tmp_path, monkeypatch, params: Params) -> Params:
    """A test that changes the run (another push, more runs in the store) works on a copy of the
    module's folder and store, so the others find the run as finished_run left it, in any order."""
    copy = tmp_path / "copy"
    shutil.copytree(workdir, copy)
    monkeypatch.chdir(copy)
    return with_changes(params, tracking={"tracking_uri": f"sqlite:///{copy}/mlflow.db"})


@pytest.fixture(scope="module")
def finished_run(workdir, tiny_params):
    with contextlib.chdir(workdir):
        for stage in STAGES:
            stage.run(tiny_params)
        return track.run(tiny_params)


def file_hashes(*folders) -> dict:
    return {path: hashlib.sha256(path.read_bytes()).hexdigest()
            for folder in folders for path in sorted(folder.rglob("*")) if path.is_file()}


def test_one_mlflow_run_holds_everything(finished_run, tiny_params):
    mlflow.set_tracking_uri(tiny_params.tracking.tracking_uri)
    runs = mlflow.search_runs(experiment_names=[tiny_params.tracking.experiment], output_format="list")
    (run,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert run.info.run_id == finished_run["run_id"]
    assert_nested_stage_runs(runs, run)

    # params of every stage
    for key in ("snapshot.synthetic.topics", "validate.min_rows", "teacher.kind", "train.learning_rate",
                "evaluate.batch_size", "card.model_name", "push.dry_run"):
        assert key in run.data.params, key
    assert float(run.data.params["train.learning_rate"]) == tiny_params.train.learning_rate

    # the loss curve at step resolution
    steps = json.loads((RECORDS_DIR / "train.json").read_text())["metrics"]["steps"]
    client = mlflow.MlflowClient()
    for name in ("train_loss", "train_base_loss", "train_document_regularizer_loss",
                 "train_learning_rate", "train_grad_norm", "train_query_active_dims",
                 "train_document_active_dims"):  # every trainer log, at its step
        history = client.get_metric_history(run.info.run_id, name)
        assert [m.step for m in history] == list(range(1, steps + 1)), name
    vocabulary = tiny_params.train.student.vocab_size
    for m in client.get_metric_history(run.info.run_id, "train_document_active_dims"):
        assert 0 < m.value <= vocabulary

    # evaluation during training, every eval_steps and at the last step, named without '@'
    ndcg = client.get_metric_history(run.info.run_id, "train_eval_dot_ndcg_at_10")
    assert [m.step for m in ndcg] == sorted({*range(EVAL_STEPS, steps + 1, EVAL_STEPS), steps})
    assert all(0 <= m.value <= 1 for m in ndcg)

    # eval metrics, named without '@', equal to the metrics file; the headline first, in the description
    expected = json.loads(EVAL_METRICS.read_text())["student"]["dot_ndcg@10"]
    assert run.data.metrics["evaluate.dot_ndcg_at_10"] == pytest.approx(expected)
    description = run.data.tags["mlflow.note.content"]
    assert re.search(rf"^\| dot_ndcg@10 \| {expected:.4f} \[", description, re.M) and "**Gate (significance): " in description
    assert not any("@" in name for name in run.data.metrics)

    # emissions, per stage and in total
    assert run.data.metrics["emissions_kg_co2eq"] > 0
    assert run.data.metrics["energy_kwh"] > 0
    assert run.data.metrics["train.energy_kwh"] > 0

    # the teacher: which one, how many pairs it scored, how fast, at what energy
    teacher_record = json.loads((RECORDS_DIR / "teacher.json").read_text())
    assert run.data.tags["teacher.model"] == teacher_record["facts"]["teacher"]["model"]
    assert run.data.metrics["teacher.pairs_scored"] == teacher_record["metrics"]["unique_pairs"] > 0
    assert run.data.metrics["teacher.pairs_per_second"] > 0
    assert run.data.metrics["teacher.energy_kwh"] > 0

    # card and metrics JSON as artifacts
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id)}
    assert {"README.md", "eval.json", "push_plan.json", "manifest.json", "report.json",
            "ndcg_per_dataset.csv", "plots"} <= artifacts
    figures = {a.path for a in mlflow.MlflowClient().list_artifacts(run.info.run_id, "plots")}
    assert figures == {"plots/ndcg_per_dataset.png", "plots/document_active_dims.png"}
    # the BM25 row, beside the models
    evaluation = json.loads(EVAL_METRICS.read_text())
    assert run.data.metrics["evaluate.bm25_dot_ndcg_at_10"] == pytest.approx(evaluation["bm25"]["dot_ndcg@10"])
    assert evaluation["datasets"]["synthetic"]["bm25"] == evaluation["bm25"]


def test_card_and_push_folder(finished_run, tiny_params):
    from huggingface_hub import ModelCard

    text = (CARD_DIR / "README.md").read_text()
    parsed = ModelCard(text)
    assert parsed.data.library_name == "sentence-transformers"
    assert parsed.data.co2_eq_emissions["energy_consumed"] > 0
    index = parsed.data.eval_results
    ndcg = next(r for r in index if r.metric_type == "dot_ndcg@10")
    assert ndcg.metric_value == pytest.approx(json.loads(EVAL_METRICS.read_text())["student"]["dot_ndcg@10"], abs=1e-6)
    assert tiny_params.push.repo_id in text and "{{" not in text
    assert card.missing_sections(text) == []
    student = card.card_metrics(json.loads(EVAL_METRICS.read_text())["student"])
    assert len(student) == 21 and {r.metric_type for r in index if r.dataset_name == "synthetic"} == set(student)
    assert parsed.data.base_model is None and parsed.data.datasets is None  # built from config, synthetic data
    assert {"loss:SpladeLoss", "loss:SparseMarginMSELoss", "splade"} <= set(parsed.data.tags)
    steps = json.loads((RECORDS_DIR / "train.json").read_text())["metrics"]["steps"]
    assert f"| **1.0000** | **{steps}** |" in text  # the saved model's row of the training logs
    assert "`learning_rate`: 0.0003" in text.split("#### All Hyperparameters")[0]  # a non-default
    for figure in card.FIGURES:
        assert (CARD_DIR / figure).read_bytes()[:4] == b"\x89PNG" and f"]({figure})" in text

    # the card's ONNX usage, run as written on the folder a push uploads: in fp32 it gives the
    # vectors of the saved model (torch); the int8 file as written runs and points the same way
    onnx_usage = text.split("### ONNX")[1].split("```python\n")[1].split("```")[0]
    onnx_usage = onnx_usage.replace(f"snapshot_download({json.dumps(tiny_params.push.repo_id)})", repr(str(PUSH_DIR)))
    texts = ["alpha beta gamma", "a longer text about several different things"]
    model = SparseEncoder(str(STUDENT_DIR), device="cpu")
    torch_vectors = model.encode_query(texts, convert_to_tensor=True).to_dense().numpy()
    for file, tolerance in (("model.onnx", 1e-4), ("model_qint8.onnx", None)):
        namespace = {"queries": texts, "documents": texts}
        exec(onnx_usage.replace("model_qint8.onnx", file), namespace)
        vectors = namespace["encode"](texts)
        assert vectors.shape == torch_vectors.shape and (vectors > 0).sum(axis=1).max() <= model.max_active_dims
        if tolerance:
            np.testing.assert_allclose(vectors, torch_vectors, atol=tolerance)
        else:
            cosine = (vectors * torch_vectors).sum(axis=1) / np.linalg.norm(vectors, axis=1) / np.linalg.norm(
                torch_vectors, axis=1)
            assert (cosine > 0.9).all(), cosine

    plan = json.loads(PUSH_PLAN.read_text())
    assert plan["dry_run"] is True and plan["commit"] is None
    uploaded = {f["path"] for f in plan["files"]}
    assert {"README.md", "model.safetensors", "modules.json", "config_sentence_transformers.json",
            *card.FIGURES} <= uploaded
    assert (PUSH_DIR / "README.md").read_text() == text
    model_files = {p.relative_to(STUDENT_DIR).as_posix() for p in STUDENT_DIR.rglob("*") if p.is_file()}
    assert model_files - {"README.md"} <= uploaded


def test_an_incomplete_card_is_named_section_by_section():
    complete = "\n".join(f"{section}\n\ntext\n" for section in card.SECTIONS)
    assert card.missing_sections(complete) == []
    broken = complete.replace("### Training Logs\n\ntext\n", "").replace("## Usage\n\ntext", "## Usage\n")
    assert card.missing_sections(broken + "More Information Needed") == [
        "section '## Usage' is empty", "no section '### Training Logs'", "placeholder 'More Information Needed'"]


def test_snapshot_is_the_runs_dataset_input(finished_run, tiny_params):
    mlflow.set_tracking_uri(tiny_params.tracking.tracking_uri)
    run = mlflow.get_run(finished_run["run_id"])
    (dataset_input,) = run.inputs.dataset_inputs
    manifest = json.loads(SNAPSHOT_MANIFEST.read_text())["train"]
    assert dataset_input.dataset.digest == manifest["sha256"][:36]
    assert dataset_input.tags[0].value == "training"
    assert json.loads(dataset_input.dataset.profile)["num_rows"] == manifest["rows"]


def test_a_tracking_server_gets_the_runs_and_serves_the_champion_model(finished_run, tiny_params, workdir, tmp_path,
                                                                      monkeypatch, chromium):
    """A real `mlflow server` on 127.0.0.1 (sqlite backend) gets the finished pipeline's run (the
    track stage pointed at it), with a nested run per stage; the student registered as challenger and
    champion, loaded back by alias as a pyfunc that encodes text to sparse vectors; a model that fails
    the gate stays challenger only. The MLflow UI's comparison of the two runs, opened in headless
    Chromium, plots the headline metric and shows both runs' values."""
    tiny_params = in_a_copy(workdir, tmp_path, monkeypatch, tiny_params)  # its records are the server's
    from tests.helpers.services import BIN, Server, free_port

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = Server([str(BIN / "mlflow"), "server", "--host", "127.0.0.1", "--port", str(port),
                     "--workers", "1", "--backend-store-uri", f"sqlite:///{tmp_path}/server.db",
                     "--artifacts-destination", str(tmp_path / "server-artifacts")],
                    {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"},  # up in ~7 s, not ~22
                    f"{uri}/health", tmp_path / "server.log")
    server.start()
    try:
        params = tiny_params.model_copy(update={"tracking": tiny_params.tracking.model_copy(
            update={"tracking_uri": uri, "registered_model": "quickstart-sparse"})})
        outcome = track.run(params)

        mlflow.set_tracking_uri(uri)
        runs = mlflow.search_runs(experiment_names=[params.tracking.experiment], output_format="list")
        (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
        assert parent.info.run_id == outcome["run_id"]
        assert_nested_stage_runs(runs, parent)
        assert outcome["registered"]["promoted"] and outcome["registered"]["version"] == "1"

        alias = f"champion-{outcome['registered']['eval_id']}"  # the one champion alias: of this evaluation
        assert outcome["registered"]["alias"] == alias
        champion = mlflow.pyfunc.load_model(f"models:/quickstart-sparse@{alias}")
        train_rows = __import__("pandas").read_parquet(SNAPSHOT_TRAIN)
        (query,) = champion.predict([train_rows["query"][0]], params={"side": "query"})
        assert 0 < len(query["indices"]) == len(query["values"]) and min(query["values"]) > 0
        from sentence_transformers import SparseEncoder
        expected = SparseEncoder(str(STUDENT_DIR)).encode_query([train_rows["query"][0]]).coalesce()
        assert sorted(query["indices"]) == sorted(expected.indices()[1].tolist())

        again = track.run(params)  # the same pipeline run tracked again: logged and registered once
        assert (again["run_id"], again["registered"]["version"]) == (outcome["run_id"], "1")
        assert len(mlflow.search_runs(experiment_names=[params.tracking.experiment], output_format="list")) == len(runs)

        strict = params.model_copy(update={"push": params.push.model_copy(update={
            "gate": params.push.gate.model_copy(update={"minimum": 0.999})})})
        refused = track.run(strict)["registered"]
        assert refused["version"] == "2" and not refused["promoted"] and "below push.gate.minimum" in refused["reason"]
        client = mlflow.MlflowClient()
        assert client.get_model_version_by_alias("quickstart-sparse", alias).version == "1"
        assert "champion" not in client.get_registered_model("quickstart-sparse").aliases
        assert client.get_model_version_by_alias("quickstart-sparse", "challenger").version == "2"

        # the two pipeline runs side by side in the MLflow UI, as a person sees them (headless Chromium)
        parents = [r for r in mlflow.search_runs(experiment_names=[params.tracking.experiment], output_format="list")
                   if "mlflow.parentRunId" not in r.data.tags]
        assert len(parents) == 2
        text, shown = mlflow_compare_view(chromium, uri, parents[0].info.experiment_id,
                                          [r.info.run_id for r in parents], tmp_path / "compare.png",
                                          "evaluate.dot_ndcg_at_10")
        assert "Comparing 2 Runs from 1 Experiment" in text and "push.gate.minimum" in text
        # the plot's metric is the headline one (the first a run logs); each run's value in the table
        assert re.search(r"^Metrics:\n(.*\n){0,2}evaluate\.dot_ndcg_at_10$", text, re.M), text[:1500]
        assert shown == [f"{r.data.metrics['evaluate.dot_ndcg_at_10']:.3g}" for r in parents]
        assert (tmp_path / "compare.png").stat().st_size > 50_000
    finally:
        server.stop()


def stopped_runs(params: Params) -> list:
    mlflow.set_tracking_uri(params.tracking.tracking_uri)
    return [r for r in mlflow.search_runs(experiment_names=[params.tracking.experiment], output_format="list")
            if "mlflow.parentRunId" not in r.data.tags and r.data.tags.get("outcome") != "ok"]


def test_a_run_the_gate_refuses_or_a_stage_fails_is_in_mlflow_and_the_model_is_untouched(finished_run, tiny_params,
                                                                                         workdir, tmp_path, monkeypatch):
    """Push refused by the gate: the run is in MLflow with every param, the evaluation's metrics and
    tags saying what refused it and why; the model, metrics and card files are as they were. A stage
    failing (an upload without a token) is on record the same way, as failed."""
    tiny_params = in_a_copy(workdir, tmp_path, monkeypatch, tiny_params)
    before = file_hashes(STUDENT_DIR, EVAL_METRICS.parent, CARD_DIR)
    refusing = with_changes(tiny_params, push={"gate": {"minimum": 0.999}})
    with pytest.raises(GateRefused, match="below push.gate.minimum 0.9990"):
        push.run(refusing)
    assert file_hashes(STUDENT_DIR, EVAL_METRICS.parent, CARD_DIR) == before
    (refused,) = stopped_runs(tiny_params)
    assert refused.info.status == "FAILED"
    assert refused.data.tags["outcome"] == "refused" and refused.data.tags["stopped_by"] == "push.gate"
    assert "below push.gate.minimum 0.9990" in refused.data.tags["reason"]
    evaluation = json.loads(EVAL_METRICS.read_text())
    assert refused.data.metrics["evaluate.dot_ndcg_at_10"] == pytest.approx(evaluation["student"]["dot_ndcg@10"])
    assert refused.data.params["push.gate.minimum"] == "0.999" and "train.learning_rate" in refused.data.params
    finished = mlflow.get_run(finished_run["run_id"])
    assert set(finished.data.params) == set(refused.data.params)  # they compare column by column
    assert refused.data.tags["eval.id"] == finished.data.tags["eval.id"]
    assert "plots/ndcg_per_dataset.png" in {a.path for a in mlflow.MlflowClient().list_artifacts(
        refused.info.run_id, "plots")}
    assert json.loads(PUSH_PLAN.read_text())["gate"]["passed"] is False

    monkeypatch.delenv("HF_TOKEN", raising=False)
    with pytest.raises(StageError, match="HF_TOKEN is not set"):
        push.run(with_changes(tiny_params, push={"dry_run": False}))
    failed = next(r for r in stopped_runs(tiny_params) if r.data.tags["outcome"] == "failed")
    assert failed.data.tags["stopped_by"] == "push" and "HF_TOKEN is not set" in failed.data.tags["reason"]
    assert failed.data.metrics["train.steps"] > 0


def test_two_ranks_evaluating_in_bf16_share_every_model_s_shards(finished_run, tiny_params, workdir, tmp_path,
                                                                monkeypatch):
    """evaluate.precision bf16 (forced on this CPU) under RANK / WORLD_SIZE 2: the helper rank's
    shards of every scored model (student, base, the int8 ONNX student) are the ones rank 0 reads;
    rank 0 encodes only its own share, waits for none and keeps every file the helper wrote."""
    from pipeline.config import EVAL_SHARDS_DIR

    params = with_changes(in_a_copy(workdir, tmp_path, monkeypatch, tiny_params),
                          evaluate={"precision": "bf16", "shard_docs": 4, "wait_seconds": 5})
    shutil.rmtree(EVAL_SHARDS_DIR)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    helper = evaluate.run(params)
    assert set(helper) == {"models/student", "models/base", "models/student int8"}
    assert all(encoded["shards_encoded"] >= 1 for model in helper.values() for encoded in model.values())
    written = {path: path.stat().st_mtime_ns for path in EVAL_SHARDS_DIR.rglob("*.npz")}
    monkeypatch.setenv("RANK", "0")
    result = evaluate.run(params)  # a shard named apart from the helper's: "no new shard for 5 s"
    assert "student_onnx_int8" in result
    assert {path: path.stat().st_mtime_ns for path in written if path.exists()} == written  # read, not redone
    assert len(list(EVAL_SHARDS_DIR.rglob("*.npz"))) == sum(e["shards"] for m in helper.values() for e in m.values())


def test_a_version_evaluated_on_another_set_is_champion_of_its_own_evaluation(finished_run, tiny_params,
                                                                              cut_beir, workdir, tmp_path, monkeypatch):
    """The quickstart's champion scores high on its synthetic set; the same student evaluated on
    SciFact scores far lower. Registered under the same name it still becomes champion of SciFact,
    reported, not compared with the synthetic number; the synthetic champion keeps its own alias, and
    no alias names the latest promotion on any evaluation."""
    params = with_changes(in_a_copy(workdir, tmp_path, monkeypatch, tiny_params), push={"gate": {"beat_base": False}},
                          snapshot={"eval": {"source": str(cut_beir("scifact", queries=10, extra_docs=100))}})
    copy = tmp_path / "copy"
    snapshot.run(params)
    evaluate.run(params)
    outcome = track.run(params)["registered"]
    first = finished_run["registered"]
    assert outcome["value"] < first["value"] - params.push.gate.max_drop  # a cross-set comparison would refuse
    assert outcome["promoted"] and outcome["champion_version"] is None and outcome["eval_id"] != first["eval_id"]
    assert (f"champions of other evaluations, not compared: champion-{first['eval_id']} (version {first['version']})"
            in outcome["not_compared"])
    client = mlflow.MlflowClient(f"sqlite:///{copy}/mlflow.db")
    name = params.tracking.registered_model
    def holder(alias: str) -> str:
        return str(client.get_model_version_by_alias(name, alias).version)

    assert holder(f"champion-{outcome['eval_id']}") == outcome["version"]
    assert set(client.get_registered_model(name).aliases) == {"challenger", f"champion-{outcome['eval_id']}",
                                                              f"champion-{first['eval_id']}"}
    assert holder(f"champion-{first['eval_id']}") == first["version"]
    tags = client.get_model_version(name, outcome["version"]).tags
    assert tags["eval.source"] == params.snapshot.eval.source
    assert tags["eval.sets"] == os.path.basename(params.snapshot.eval.source)
