"""What each stage did, on record: its params, metrics, wall time and energy (codecarbon).

Every stage runs inside `stage_record`, which writes records/<stage>.json when the stage succeeds.
The last stage (`pipeline.track`) turns the records of all stages into one MLflow run, so one
pipeline execution gives one run even when DVC skipped the stages that had not changed.
"""

from __future__ import annotations

import json
import logging
import math
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from pydantic import BaseModel

from pipeline.config import RECORDS_DIR, TrackingConfig
from pipeline.runtime import is_main_process

log = logging.getLogger(__name__)


def record_path(stage: str, records_dir: Path = RECORDS_DIR) -> Path:
    return records_dir / f"{stage}.json"


def mlflow_metric_name(name: str) -> str:
    """MLflow refuses '@' in metric names: dot_ndcg@10 -> dot_ndcg_at_10."""
    return name.replace("@", "_at_")


def write_json(path: Path, payload: Any) -> None:
    """Write atomically, so a crash never leaves a half-written file behind for DVC to cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    tmp.replace(path)


@contextmanager
def stage_record(stage: str, section: BaseModel, tracking: TrackingConfig,
                 records_dir: Path = RECORDS_DIR) -> Iterator[dict]:
    """Measure a stage; the caller fills record["metrics"] (numbers) and record["facts"] (anything)."""
    from codecarbon import OfflineEmissionsTracker

    logging.getLogger("codecarbon").setLevel(logging.ERROR)  # its start-up notices come before log_level
    emissions_dir = records_dir / "emissions"
    emissions_dir.mkdir(parents=True, exist_ok=True)  # codecarbon silently records nothing without it
    tracker = OfflineEmissionsTracker(
        project_name=stage, country_iso_code=tracking.country_iso_code,
        output_dir=str(emissions_dir), output_methods=[], log_level="error",
    )
    record: dict[str, Any] = {
        "stage": stage,
        "params": section.model_dump(mode="json", by_alias=True),
        "metrics": {},
        "facts": {},
    }
    started = time.perf_counter()
    tracker.start()
    try:
        yield record
    finally:
        emissions_kg = tracker.stop()
    data = tracker.final_emissions_data
    record["seconds"] = round(time.perf_counter() - started, 3)
    record["emissions_kg_co2eq"] = float(emissions_kg or 0.0)
    record["energy_kwh"] = float(data.energy_consumed) if data else 0.0
    record["hardware"] = {
        "cpu_model": getattr(data, "cpu_model", None), "gpu_model": getattr(data, "gpu_model", None),
        "ram_total_gb": getattr(data, "ram_total_size", None), "country": tracking.country_iso_code,
    }
    for name, value in record["metrics"].items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"stage {stage}: metric {name!r} is not a finite number: {value!r}")
    if is_main_process():  # under torchrun, one record: rank 0's
        write_json(record_path(stage, records_dir), record)
    log.info("%s finished in %.1f s (%.3g kWh)", stage, record["seconds"], record["energy_kwh"])


def load_records(stages: list[str], records_dir: Path = RECORDS_DIR) -> dict[str, dict]:
    missing = [s for s in stages if not record_path(s, records_dir).exists()]
    if missing:
        raise FileNotFoundError(f"no record for stage(s) {missing} in {records_dir}/: run them first")
    return {s: json.loads(record_path(s, records_dir).read_text()) for s in stages}


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(f"{prefix}.{key}", inner))
        return out
    return {prefix: value}


def configure_mlflow(tracking: TrackingConfig) -> str:
    """Point MLflow at the sqlite store and make sure the experiment keeps artifacts in mlruns/."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri)
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is None:
        artifact_root = Path(tracking.artifact_root).resolve()
        artifact_root.mkdir(parents=True, exist_ok=True)
        return mlflow.create_experiment(tracking.experiment, artifact_location=artifact_root.as_uri())
    return experiment.experiment_id


def step_metrics(log_history: list[dict], prefix: str = "train_") -> list[tuple[str, float, int]]:
    """(name, value, step) for every number the trainer logged during training (loss, its parts,
    learning rate, grad norm, active dims, evaluations during training); the end-of-training
    summary carries no per-step value."""
    return [(mlflow_metric_name(prefix + key), float(value), entry["step"])
            for entry in log_history if "train_runtime" not in entry
            for key, value in entry.items()
            if key not in {"step", "epoch"} and isinstance(value, (int, float)) and math.isfinite(value)]


def log_pipeline_run(records: dict[str, dict], step_logs: list[tuple[str, float, int]],
                     artifacts: list[Path],
                     tracking: TrackingConfig, tags: dict[str, str],
                     datasets: list[tuple[Any, str]] = ()) -> str:
    """One MLflow run holding every stage's params, metrics, emissions and the given artifacts (the
    runs of a sweep compare column by column), with a nested run per stage holding that stage's
    own; `step_logs` are (name, value, step) series; `datasets` are (mlflow.data dataset, context)
    pairs logged as the run's inputs. `tags` go on every run."""
    import mlflow
    from mlflow.entities import Metric

    experiment_id = configure_mlflow(tracking)
    with mlflow.start_run(experiment_id=experiment_id, tags=tags) as run:
        params: dict[str, Any] = {}
        for stage, record in records.items():
            params.update(_flatten(stage, record["params"]))
        mlflow.log_params({k: ("" if v is None else v) for k, v in params.items()})

        metrics: dict[str, float] = {}
        for stage, record in records.items():
            for name, value in record["metrics"].items():
                metrics[mlflow_metric_name(f"{stage}.{name}")] = float(value)
            metrics[f"{stage}.seconds"] = record["seconds"]
            metrics[f"{stage}.energy_kwh"] = record["energy_kwh"]
            metrics[f"{stage}.emissions_kg_co2eq"] = record["emissions_kg_co2eq"]
        metrics["emissions_kg_co2eq"] = sum(r["emissions_kg_co2eq"] for r in records.values())
        metrics["energy_kwh"] = sum(r["energy_kwh"] for r in records.values())
        mlflow.log_metrics(metrics)
        for stage, record in records.items():
            stage_tags = {k: v for k, v in tags.items() if k != "mlflow.runName"}
            with mlflow.start_run(experiment_id=experiment_id, run_name=stage, nested=True,
                                  tags={**stage_tags, "stage": stage}):
                mlflow.log_params({k: ("" if v is None else v) for k, v in _flatten(stage, record["params"]).items()})
                mlflow.log_metrics({k.split(".", 1)[1]: v for k, v in metrics.items() if k.startswith(f"{stage}.")})

        # one request per 1000 points (MLflow's batch limit), not one per training step
        now = int(time.time() * 1000)
        points = [Metric(name, value, now, step) for name, value, step in step_logs]
        for start in range(0, len(points), 1000):
            mlflow.MlflowClient().log_batch(run.info.run_id, metrics=points[start:start + 1000])

        for dataset, context in datasets:
            mlflow.log_input(dataset, context=context)

        for path in artifacts:
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.name)
            else:
                mlflow.log_artifact(str(path))
        return run.info.run_id
