"""The MLflow model registry: every trained student is registered as a pyfunc model that encodes text
to sparse vectors (MLflow "models from code": pipeline/tracking/sparse_encoder_model.py, no pickle, loads
without this project), tagged with the identity of its evaluation (eval.id, eval.source, ...), under the
alias `challenger`. It becomes champion when it passes the evaluation gate (push.gate) against the
champion of the same evaluation only: it takes the alias `champion-<eval id>`, the one champion
alias there is, so that a champion was always compared with the one it displaced. A champion
measured on another evaluation is reported, never compared. The champion's per-query values come
from its own run (its metrics/per_query.csv artifact), so the comparison works from any machine.

A rerun of a registration (after a failure half-way) reuses the version already made from its run.
"""

from __future__ import annotations

import tempfile
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING

import mlflow

from pipeline.config import PER_QUERY, STUDENT_DIR, GateConfig
from pipeline.evaluation.gate import (
    Champion,
    GateRefused,
    GateScores,
    check_gate,
    metric_per_query,
    read_per_query,
)
from pipeline.evaluation.stats import Resampling
from pipeline.tracking import sparse_encoder_model
from pipeline.tracking.records import identity_tags, mlflow_metric_name

if TYPE_CHECKING:
    import pandas as pd

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


def champion_per_query(run_id: str, metric: str) -> "pd.Series | None":
    """The champion's `metric` per query, from the per-query values its own run logged (so a second
    machine compares against the shared server's champion); None for a run logged without them."""
    from mlflow.exceptions import MlflowException

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = mlflow.artifacts.download_artifacts(run_id=run_id, artifact_path=PER_QUERY.name, dst_path=folder)
        except (MlflowException, OSError):
            return None
        return metric_per_query(read_per_query(Path(path)), "student", metric)


def gate_verdict(client, name: str, gate: GateConfig, scores: GateScores, eval_id: str,
                 resampling: Resampling, texts: dict, action: str) -> dict:
    """The gate's verdict against the champion of this evaluation (alias champion-<eval id>), passed
    or not: what the push and the registry both decide by."""
    rival = version_by_alias(client, name, f"champion-{eval_id}")
    champion = (Champion(f"champion version {rival.version}", run_metric(client, rival.run_id, gate.metric),
                         champion_per_query(rival.run_id, gate.metric)) if rival else None)
    try:
        verdict = check_gate(gate, scores, champion, resampling, texts, action)
    except GateRefused as refused:
        verdict = refused.verdict
    return {**verdict, "champion_version": str(rival.version) if rival else None, "eval_id": eval_id}


def other_champions(client, name: str, eval_id: str) -> list[str]:
    """The champions of other evaluations: reported, never compared."""
    from mlflow.exceptions import MlflowException

    try:
        aliases = client.get_registered_model(name).aliases
    except MlflowException:
        return []
    return [f"{alias} (version {version})" for alias, version in sorted(aliases.items())
            if alias.startswith("champion-") and alias != f"champion-{eval_id}"]


def register(run_id: str, name: str, gate: GateConfig, scores: GateScores, identity: dict,
             resampling: Resampling, texts: dict, model_dir: Path = STUDENT_DIR) -> dict:
    """Log the model into the pipeline's MLflow run and register it as a new version of `name`,
    tagged with its evaluation's identity, with the alias challenger; promote it to
    champion-<eval id> when the gate passes against that champion."""
    from mlflow import MlflowClient

    client = MlflowClient()
    evaluation_alias = f"champion-{identity['id']}"
    # decided before this version exists: a rerun after a half-done registration compares with the
    # same champion
    verdict = gate_verdict(client, name, gate, scores, identity["id"], resampling, texts, "promoting")
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
    if verdict.get("champion_version") == version:  # a rerun: this version is the champion already
        verdict = {**verdict, "passed": True, "reason": "already the champion of this evaluation"}
    outcome = {"name": name, "version": version, "alias": evaluation_alias, "metric": gate.metric,
               "value": scores.value, "eval_id": identity["id"], "champion_version": verdict["champion_version"],
               "champion_value": verdict["previous"], "promoted": verdict["passed"], "reason": verdict["reason"],
               "verdict": verdict}
    others = other_champions(client, name, identity["id"])
    if others:
        outcome["not_compared"] = (f"champions of other evaluations, not compared: {', '.join(others)}; this "
                                   f"version was evaluated on {identity['source']} (evaluation {identity['id']})")
    if verdict["passed"]:
        client.set_registered_model_alias(name, evaluation_alias, version)
    client.set_model_version_tag(name, version, "gate", verdict["reason"][:5000])
    return outcome
