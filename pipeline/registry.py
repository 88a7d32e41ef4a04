"""The MLflow model registry: every trained student is registered as a pyfunc model that encodes text
to sparse vectors, under the alias `challenger`; it also becomes `champion` when it passes the
evaluation gate (push.gate) against the current champion.

    model = mlflow.pyfunc.load_model("models:/sparse-encoder@champion")
    model.predict(["a query"], params={"side": "query"})  # [{"indices": [...], "values": [...]}]
"""

from __future__ import annotations

from importlib import metadata
from pathlib import Path

import mlflow
import pandas as pd

from pipeline.cli import StageError
from pipeline.config import STUDENT_DIR, GateConfig
from pipeline.push import check_gate
from pipeline.tracking import mlflow_metric_name

# what a process that loads the model needs (the project itself is not required)
REQUIREMENTS = ["sentence-transformers", "transformers", "torch", "pandas"]


class SparseEncoderModel(mlflow.pyfunc.PythonModel):
    """A SparseEncoder as an MLflow pyfunc: texts in (a list, or a DataFrame's `text` column), one
    sparse vector out per text, as its active dimensions and their weights. params side: "query"
    (encode_query) or "document" (encode_document, the default)."""

    def load_context(self, context):
        from sentence_transformers import SparseEncoder

        self.model = SparseEncoder(context.artifacts["model"])

    def predict(self, context, model_input, params: dict | None = None) -> list[dict[str, list]]:
        texts = model_input["text"].tolist() if isinstance(model_input, pd.DataFrame) else list(model_input)
        side = (params or {}).get("side", "document")
        encode = self.model.encode_query if side == "query" else self.model.encode_document
        vectors = encode(texts, convert_to_sparse_tensor=True).coalesce().cpu()
        rows, columns = vectors.indices()
        values = vectors.values()
        return [{"indices": columns[rows == i].tolist(), "values": values[rows == i].tolist()}
                for i in range(len(texts))]


def run_metric(client, run_id: str, metric: str) -> float | None:
    return client.get_run(run_id).data.metrics.get(f"evaluate.{mlflow_metric_name(metric)}")


def register(run_id: str, name: str, gate: GateConfig, model_dir: Path = STUDENT_DIR) -> dict:
    """Log the model into the pipeline's MLflow run, register it as a new version of `name` with the
    alias challenger, and make it champion if the gate passes against the current champion."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    with mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=SparseEncoderModel(), artifacts={"model": str(model_dir)},
            registered_model_name=name, pip_requirements=[f"{p}=={metadata.version(p)}" for p in REQUIREMENTS])
    version = str(info.registered_model_version)
    client.set_registered_model_alias(name, "challenger", version)
    value = run_metric(client, run_id, gate.metric)
    try:
        champion = client.get_model_version_by_alias(name, "champion")
    except MlflowException:  # no champion yet
        champion = None
    previous = run_metric(client, champion.run_id, gate.metric) if champion else None
    outcome = {"name": name, "version": version, "metric": gate.metric, "value": value,
               "champion_version": champion.version if champion else None, "champion_value": previous}
    try:
        check_gate(gate, "the evaluation set", value, previous, previous_name="the champion", action="promoting")
    except StageError as refused:
        outcome.update(promoted=False, reason=str(refused))
    else:
        client.set_registered_model_alias(name, "champion", version)
        outcome.update(promoted=True, reason="passed the gate")
    client.set_model_version_tag(name, version, "gate", outcome["reason"])
    return outcome
