"""The MLflow model registry: every trained student is registered as a pyfunc model that encodes text
to sparse vectors (MLflow "models from code": pipeline/sparse_encoder_model.py, no pickle, loads
without this project), tagged with the identity of its evaluation (eval.id, eval.source, ...), under the
alias `challenger`. It becomes champion when it passes the evaluation gate (push.gate) against the
champion of the same evaluation only: it takes the alias `champion-<eval id>` (the best version on
that evaluation) and `champion` (the latest promotion). A champion measured on another evaluation
is reported, never compared.

A rerun of a registration (after a failure half-way) reuses the version already made from its run.
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import mlflow

from pipeline import sparse_encoder_model
from pipeline.config import STUDENT_DIR, GateConfig
from pipeline.gate import GateRefused, GateScores, check_gate
from pipeline.tracking import identity_tags, mlflow_metric_name

# what a process that loads the model needs (the project itself is not required)
REQUIREMENTS = ["sentence-transformers", "transformers", "torch", "pandas"]


def run_metric(client, run_id: str, metric: str) -> float | None:
    return client.get_run(run_id).data.metrics.get(f"evaluate.{mlflow_metric_name(metric)}")


def version_by_alias(client, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return client.get_model_version_by_alias(name, alias)
    except MlflowException:  # no such alias yet
        return None


def version_of_run(client, name: str, run_id: str) -> str | None:
    """The version of `name` already registered from `run_id`, if any."""
    from mlflow.exceptions import MlflowException

    try:
        versions = client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:  # no such registered model yet
        return None
    return str(versions[0].version) if versions else None


def register(run_id: str, name: str, gate: GateConfig, scores: GateScores, identity: dict,
             model_dir: Path = STUDENT_DIR) -> dict:
    """Log the model into the pipeline's MLflow run and register it as a new version of `name`,
    tagged with its evaluation's identity, with the alias challenger; promote it when the gate
    passes against the champion of the same evaluation."""
    from mlflow import MlflowClient

    client = MlflowClient()
    version = version_of_run(client, name, run_id)
    if version is None:
        from mlflow.models import infer_signature

        # params in the signature: without them MLflow drops predict's params (side: query), which an
        # inference-free model, two models in one, cannot do without
        signature = infer_signature(["a text"], params={"side": "document"})
        with mlflow.start_run(run_id=run_id):
            info = mlflow.pyfunc.log_model(
                name="model", python_model=sparse_encoder_model.__file__, artifacts={"model": str(model_dir)},
                signature=signature,
                registered_model_name=name, pip_requirements=[f"{p}=={metadata.version(p)}" for p in REQUIREMENTS])
        version = str(info.registered_model_version)
    for key, value in identity_tags(identity).items():
        client.set_model_version_tag(name, version, key, value)
    client.set_registered_model_alias(name, "challenger", version)

    evaluation_alias = f"champion-{identity['id']}"
    rival = version_by_alias(client, name, evaluation_alias)
    previous = run_metric(client, rival.run_id, gate.metric) if rival else None
    outcome = {"name": name, "version": version, "metric": gate.metric, "value": scores.value,
               "eval_id": identity["id"], "champion_version": rival.version if rival else None,
               "champion_value": previous}
    latest = version_by_alias(client, name, "champion")
    if latest is not None and latest.tags.get("eval.id") != identity["id"]:
        outcome["not_compared"] = (f"champion version {latest.version} was evaluated on {latest.tags.get('eval.source', '?')} "
                                   f"(evaluation {latest.tags.get('eval.id')}), this version on {identity['source']} "
                                   f"(evaluation {identity['id']}): not compared")
    try:
        check_gate(gate, scores, previous, previous_name=f"champion version {outcome['champion_version']}",
                   action="promoting")
    except GateRefused as refused:
        outcome.update(promoted=False, reason=str(refused))
    else:
        for alias in (evaluation_alias, "champion"):
            client.set_registered_model_alias(name, alias, version)
        outcome.update(promoted=True, reason="passed the gate")
    client.set_model_version_tag(name, version, "gate", outcome["reason"])
    return outcome
