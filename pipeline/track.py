"""Stage 8: one MLflow run for this pipeline execution, and the model in the registry.

Gathers every stage's record (params, metrics, time, energy), the training loss curve at step
resolution, and the card, metrics, validation report, manifest and push plan as artifacts, with a
nested run per stage; every run is tagged with the git revision and the dvc.lock hash. Registers the
student (pipeline.registry: alias challenger, and champion when it passes the gate). Writes the run
id and the registration to records/mlflow_run.json.
"""

from __future__ import annotations

import json
import warnings

from pipeline import push, registry, snapshot
from pipeline.cli import stage_main
from pipeline.config import (CARD_DIR, EVAL_METRICS, NDCG_TABLE, PLOTS_DIR, RECORDS_DIR, SNAPSHOT_DIR,
                             TRAIN_LOSS, VALIDATION_REPORT, Params)
from pipeline.tracking import load_records, log_pipeline_run, step_metrics, write_json

STAGES = ["snapshot", "validate", "teacher", "train", "evaluate", "card", "push"]
RUN_FILE = RECORDS_DIR / "mlflow_run.json"


def training_dataset(params: Params):
    """The snapshot as an mlflow.data dataset, named by its source and carrying its content hash."""
    import mlflow.data
    import pandas as pd

    manifest = json.loads((SNAPSHOT_DIR / snapshot.MANIFEST_FILE).read_text())["train"]
    frame = pd.read_parquet(SNAPSHOT_DIR / snapshot.TRAIN_FILE)
    source = manifest["source"] + (f"@{manifest['revision']}" if manifest["revision"] else "")
    with warnings.catch_warnings():  # "synthetic" or a Hub id reads as several source types
        warnings.simplefilter("ignore", UserWarning)
        # MLflow keeps at most 36 characters of a digest
        return mlflow.data.from_pandas(frame, source=source, name=f"train ({manifest['kind']})",
                                       digest=manifest["sha256"][:36])


def run(params: Params) -> dict:
    records = load_records(STAGES)
    artifacts = [CARD_DIR / "README.md", EVAL_METRICS, NDCG_TABLE, PLOTS_DIR, TRAIN_LOSS, VALIDATION_REPORT,
                 SNAPSHOT_DIR / snapshot.MANIFEST_FILE, push.PLAN_FILE]
    revision = push.git_revision()
    tags = {"git_revision": revision, "dvc_lock": push.dvc_lock_hash(), "model_name": params.card.model_name}
    # which teacher produced the labels: a folder's weights sha256 or a Hub id's revision
    tags.update({f"teacher.{k}": str(v) for k, v in records["teacher"]["facts"].get("teacher", {}).items()})
    steps = step_metrics(records["train"]["facts"]["log_history"])
    run_id = log_pipeline_run(records, steps, artifacts, params.tracking,
                              {**tags, "mlflow.runName": f"{params.card.model_name} @ {revision}"},
                              [(training_dataset(params), "training")])
    registered = registry.register(run_id, params.tracking.registered_model, params.push.gate)
    out = {"run_id": run_id, "experiment": params.tracking.experiment,
           "tracking_uri": params.tracking.tracking_uri, "registered": registered}
    write_json(RUN_FILE, out)
    print(f"MLflow run {run_id} in experiment {params.tracking.experiment!r} "
          f"({params.tracking.tracking_uri}); see it with: mlflow ui --backend-store-uri "
          f"{params.tracking.tracking_uri}")
    print(f"registered {registered['name']} version {registered['version']} (challenger); "
          + ("champion" if registered["promoted"] else f"not champion: {registered['reason']}"))
    return out


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
