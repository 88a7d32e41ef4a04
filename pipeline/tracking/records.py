"""What each stage did, on record: its params, metrics, wall time and energy (codecarbon).

Every stage runs inside `stage_record`, which writes records/<stage>.json when the stage succeeds.
The last stage (`pipeline.stages.track`) turns the records of all stages into one MLflow run, so one
pipeline execution gives one run even when DVC skipped the stages that had not changed. A stage
that fails (or whose gate refuses the model) puts its run in MLflow itself, with the records of the
stages before it and a tag naming what stopped it: no run is lost from a sweep.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator
from urllib.parse import urlsplit

from pipeline.cli import GateRefused, StageError
from pipeline.config import (
    CARD_DIR,
    EVAL_METRICS,
    NDCG_TABLE,
    PER_QUERY,
    PLOTS_DIR,
    PUSH_PLAN,
    RECORDED_STAGES,
    RECORDS_DIR,
    RUNS_DIR,
    SNAPSHOT_MANIFEST,
    TRAIN_LOSS,
    VALIDATION_REPORT,
    Params,
    TrackingConfig,
)
from pipeline.runtime import is_main_process, machine_fingerprint

log = logging.getLogger(__name__)

DVC_LOCK = Path("dvc.lock")
# the outcome tag of a pipeline run: ok, refused (by the evaluation gate) or failed (a stage)
OUTCOME_TAG = "outcome"
RUN_KEY_TAG = "run_key"
# MLFLOW_TRACKING_URI as the user (or CI) set it, read once: mlflow.set_tracking_uri() rewrites the
# variable in this process
USER_TRACKING_URI = os.environ.get("MLFLOW_TRACKING_URI")


def record_path(stage: str, records_dir: Path = RECORDS_DIR) -> Path:
    return records_dir / f"{stage}.json"


def mlflow_metric_name(name: str) -> str:
    """MLflow refuses '@' in metric names: dot_ndcg@10 -> dot_ndcg_at_10."""
    return name.replace("@", "_at_")


def current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def write_atomically(path: Path, write) -> None:
    """`write(temporary path)`, then rename it to `path`: a crash never leaves a half-written file
    for DVC to cache, and processes writing at once (ranks) never share a temporary file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(handle)
    try:
        write(Path(tmp))
        os.chmod(tmp, 0o666 & ~current_umask())  # as a plain write would leave it, not mkstemp's 0600
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def replace_folder(path: Path, write) -> None:
    """`write(temporary folder)`, then swap it in for the folder `path`: a crash leaves the old folder
    or the new one (or, between the two renames, none), never a half-written one; a crashed run's
    temporary folders are removed by the next."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    try:
        write(tmp)
        os.chmod(tmp, 0o777 & ~current_umask())  # as mkdir would leave it, not mkdtemp's 0700
        if path.exists():
            old = tmp.with_name(f"{tmp.name[:-len('.tmp')]}.old.tmp")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old)
        else:
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_json(path: Path, payload: Any) -> None:
    text = json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text))


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def dvc_lock_hash() -> str:
    """sha256 (first 12 hex digits) of dvc.lock's entries for the stages that made the model (its
    data, params and outputs); push and track are left out, their entries are last run's."""
    import yaml

    if not DVC_LOCK.exists():
        return "none"
    stages = yaml.safe_load(DVC_LOCK.read_text()).get("stages", {})
    upstream = {name: entry for name, entry in stages.items() if name not in ("push", "track")}
    return hashlib.sha256(json.dumps(upstream, sort_keys=True).encode()).hexdigest()[:12]


# what each stage leaves that the MLflow run keeps as artifacts
STAGE_ARTIFACTS = {"snapshot": [SNAPSHOT_MANIFEST], "validate": [VALIDATION_REPORT], "train": [TRAIN_LOSS],
                   "evaluate": [EVAL_METRICS, NDCG_TABLE, PER_QUERY, PLOTS_DIR, RUNS_DIR], "card": [CARD_DIR / "README.md"],
                   "push": [PUSH_PLAN]}


@contextmanager
def stage_record(stage: str, params: Params, records_dir: Path = RECORDS_DIR) -> Iterator[dict]:
    """Measure a stage; the caller fills record["metrics"] (numbers) and record["facts"] (anything).
    When the stage raises, its run goes to MLflow as failed (or refused, by the gate) before the
    error goes on."""
    from codecarbon import OfflineEmissionsTracker

    logging.getLogger("codecarbon").setLevel(logging.ERROR)  # its start-up notices come before log_level
    record: dict[str, Any] = {"stage": stage, "params": params.section(stage).model_dump(mode="json", by_alias=True),
                              "metrics": {}, "facts": {}}
    started_at = time.time()
    # codecarbon needs an existing output folder (or silently records nothing); it writes nothing there
    with tempfile.TemporaryDirectory() as emissions_dir:
        tracker = OfflineEmissionsTracker(
            project_name=stage, country_iso_code=params.tracking.country_iso_code,
            output_dir=emissions_dir, output_methods=[], log_level="error")
        started = time.perf_counter()
        tracker.start()
        try:
            yield record
        except Exception as error:
            measure(record, tracker, started, params.tracking)
            if is_main_process():
                record_stopped_run(stage, params, record, error, started_at, records_dir)
            raise
        measure(record, tracker, started, params.tracking)
    record["started_at"], record["finished_at"] = started_at, time.time()  # the MLflow runs' real times
    for name, value in record["metrics"].items():
        if not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"stage {stage}: metric {name!r} is not a finite number: {value!r}")
    if is_main_process():  # under torchrun, one record: rank 0's
        write_json(record_path(stage, records_dir), record)
    log.info("%s finished in %.1f s (%.3g kWh)", stage, record["seconds"], record["energy_kwh"])


def measure(record: dict, tracker, started: float, tracking: TrackingConfig) -> None:
    """The stage's wall time, energy, emissions and hardware, into its record."""
    emissions_kg = tracker.stop()
    data = tracker.final_emissions_data
    record["seconds"] = round(time.perf_counter() - started, 3)
    record["emissions_kg_co2eq"] = float(emissions_kg or 0.0)
    record["energy_kwh"] = float(data.energy_consumed) if data else 0.0
    record["hardware"] = {
        "cpu_model": getattr(data, "cpu_model", None), "gpu_model": getattr(data, "gpu_model", None),
        "ram_total_gb": getattr(data, "ram_total_size", None), "country": tracking.country_iso_code,
    }
    record["machine"] = machine_fingerprint()


def record_stopped_run(stage: str, params: Params, record: dict, error: Exception, started_at: float,
                       records_dir: Path = RECORDS_DIR) -> str | None:
    """Put a run that `stage` stopped into MLflow: every param, the records (metrics, emissions) of
    the stages before it and its own, the artifacts they left, and tags saying what stopped it
    (outcome refused or failed, stopped_by, reason). A failure to log is reported, never raised:
    the stage's own error is what the user needs to see."""
    try:
        before = RECORDED_STAGES[:RECORDED_STAGES.index(stage)] if stage in RECORDED_STAGES else RECORDED_STAGES
        records = load_records([s for s in before if record_path(s, records_dir).exists()], records_dir)
        records[stage] = {**record, "started_at": started_at, "finished_at": time.time(),
                          "metrics": {k: v for k, v in record["metrics"].items()
                                      if isinstance(v, (int, float)) and math.isfinite(v)}}
        refused = isinstance(error, GateRefused)
        tags = {**pipeline_tags(params, records), OUTCOME_TAG: "refused" if refused else "failed",
                "stopped_by": f"{stage}.gate" if refused else stage, "reason": str(error)[:4000]}
        tags["mlflow.runName"] += " (refused)" if refused else f" (failed at {stage})"
        # what this attempt of the stage wrote (a validation report, a push plan) is evidence too
        artifacts = [path for s in records for path in STAGE_ARTIFACTS.get(s, [])
                     if s != stage or (path.exists() and path.stat().st_mtime >= started_at)]
        with patient_at_most(seconds=10, retries=1):  # an unreachable server must not hold back the stage's error
            run_id = log_pipeline_run(records, params, tags, artifacts, status="FAILED")
        log.warning("the stopped run is in MLflow: run %s, %s=%s (%s)", run_id, OUTCOME_TAG,
                    tags[OUTCOME_TAG], shown_uri(tracking_uri(params.tracking)))
        return run_id
    except Exception as logging_error:  # noqa: BLE001  (the stage's error matters more)
        log.warning("could not put the stopped run into MLflow (%s: %s)", type(logging_error).__name__,
                    logging_error)
        return None


@contextmanager
def patient_at_most(seconds: int, retries: int) -> Iterator[None]:
    """Each MLflow HTTP call waits at most `seconds` for an answer and is retried `retries` times with
    exponential backoff (2, 4, 8 s...) on a dropped connection or a 5xx (MLflow's defaults retry
    for minutes), unless the user set these limits."""
    limits = {"MLFLOW_HTTP_REQUEST_TIMEOUT": str(seconds), "MLFLOW_HTTP_REQUEST_MAX_RETRIES": str(retries)}
    chosen = {name: value for name, value in limits.items() if name not in os.environ}
    os.environ.update(chosen)
    try:
        yield
    finally:
        for name in chosen:
            os.environ.pop(name, None)


# an MLflow server that drops out: each call waits HTTP_TIMEOUT s, retried with backoff 2, 4, 8 s
HTTP_TIMEOUT, HTTP_RETRIES = 30, 3


@contextmanager
def mlflow_server_calls(tracking: TrackingConfig, consequence: str) -> Iterator[None]:
    """MLflow calls, each retried at most HTTP_RETRIES times: a server that stays down fails the
    stage naming it (its password hidden) and saying `consequence`."""
    uri = tracking_uri(tracking)
    with patient_at_most(seconds=HTTP_TIMEOUT, retries=HTTP_RETRIES):
        try:
            yield
        except Exception as error:
            if is_server(uri) and not server_answers(uri):
                raise StageError(f"the MLflow server {shown_uri(uri)} does not answer (each call retried "
                                 f"{HTTP_RETRIES} times, with backoff): {type(error).__name__}. {consequence}") from error
            raise


def evaluation_identity(manifest: dict) -> dict:
    """What a score was measured on: the evaluation's source, revision, split, set names and content
    hash, and a short id of all of them. Scores compare only between equal identities."""
    evaluation = manifest["eval"]
    identity = {"source": evaluation["source"], "revision": evaluation["revision"],
                "split": evaluation["split"], "sets": sorted(evaluation["sets"]),
                "sha256": evaluation["sha256"]}
    identity["id"] = hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:12]
    return identity


def main_result_name(manifest: dict) -> str:
    """The name of an evaluation's main result: its set, or "<source> mean" over several sets (as
    NanoBEIR cards list it)."""
    sets = list(manifest["eval"]["sets"])
    return sets[0] if len(sets) == 1 else f"{Path(manifest['eval']['source']).name} mean"


def identity_tags(identity: dict) -> dict[str, str]:
    """The identity as MLflow tags: eval.id, eval.source, eval.revision, eval.split, eval.sets, eval.sha256."""
    return {f"eval.{key}": ",".join(value) if isinstance(value, list) else str(value or "")
            for key, value in identity.items()}


def run_key(lock_hash: str, params: Params) -> str:
    """What identifies one pipeline run: the dvc.lock entries of the stages that made its model and
    every param. Logging a run again under the same key (a rerun after a failure) replaces the
    earlier attempt instead of adding a second run."""
    flat = _flatten_sections(params.model_dump(mode="json", by_alias=True))
    return hashlib.sha256(json.dumps([lock_hash, flat], sort_keys=True).encode()).hexdigest()[:16]


def pipeline_tags(params: Params, records: dict[str, dict]) -> dict[str, str]:
    """Tags of a pipeline run: the git revision and dvc.lock hash it ran at, its run key, the teacher
    that labelled its data, and the identity of its evaluation."""
    revision, lock_hash = git_revision(), dvc_lock_hash()
    tags = {"git_revision": revision, "dvc_lock": lock_hash, RUN_KEY_TAG: run_key(lock_hash, params),
            "model_name": params.card.model_name, "mlflow.runName": f"{params.card.model_name} @ {revision}"}
    machine = records.get("train", records.get("evaluate", {})).get("machine")  # where the model was made
    if machine:
        tags.update(machine_tags(machine))
    if "teacher" in records:  # a folder's weights sha256 or a Hub id's revision
        tags.update({f"teacher.{k}": str(v) for k, v in records["teacher"]["facts"].get("teacher", {}).items()})
    if "manifest" in records.get("snapshot", {}).get("facts", {}):  # not when the snapshot itself failed
        tags.update(identity_tags(evaluation_identity(records["snapshot"]["facts"]["manifest"])))
    return tags


def fact_text(value) -> str:
    """A fingerprint's value as text: a list "a,b", a mapping "k=v,k2=v2", anything else str()."""
    if isinstance(value, list):
        return ",".join(value)
    if isinstance(value, dict):
        return ",".join(f"{k}={v}" for k, v in value.items())
    return str(value)


def machine_tags(machine: dict) -> dict[str, str]:
    """A machine fingerprint (pipeline.runtime) as MLflow tags: machine.id, machine.cpu_model, ..."""
    return {f"machine.{key}": fact_text(value) for key, value in machine.items()}


def load_records(stages: list[str], records_dir: Path = RECORDS_DIR) -> dict[str, dict]:
    missing = [s for s in stages if not record_path(s, records_dir).exists()]
    if missing:
        raise FileNotFoundError(f"no record for stage(s) {missing} in {records_dir}/: run them first")
    return {s: json.loads(record_path(s, records_dir).read_text()) for s in stages}


def _ms(record: dict, key: str) -> int | None:
    """A record's time in MLflow's milliseconds (None for a record from before records held them)."""
    return int(record[key] * 1000) if key in record else None


def _flatten_sections(sections: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, section in sections.items():
        out.update(_flatten(name, section))
    return out


def _flatten(prefix: str, value: Any) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for key, inner in value.items():
            out.update(_flatten(f"{prefix}.{key}", inner))
        return out
    return {prefix: value}


def tracking_uri(tracking: TrackingConfig) -> str:
    """Where runs go: the MLFLOW_TRACKING_URI environment variable when set (a CI secret, a shared
    server), else tracking.tracking_uri. Where a run is recorded changes none of its numbers."""
    return USER_TRACKING_URI or tracking.tracking_uri


def is_server(uri: str) -> bool:
    return urlsplit(uri).scheme in ("http", "https")


def server_answers(uri: str) -> bool:
    """Whether the MLflow server at `uri` answers its health check within 5 s."""
    import urllib.request

    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=5):
            return True
    except OSError:
        return False


def shown_uri(uri: str) -> str:
    """`uri` fit for a log: a password in it replaced by ***."""
    parts = urlsplit(uri)
    if parts.password is None:
        return uri
    return parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")).geturl()


def configure_mlflow(tracking: TrackingConfig) -> str:
    """Point MLflow at the store and return the experiment's id, creating the experiment if needed: on
    a local store its artifacts go to tracking.artifact_root; a server keeps them where it was told
    (mlflow server --artifacts-destination)."""
    import mlflow

    uri = tracking_uri(tracking)
    mlflow.set_tracking_uri(uri)
    experiment = mlflow.get_experiment_by_name(tracking.experiment)
    if experiment is not None:
        return experiment.experiment_id
    if is_server(uri):
        return mlflow.create_experiment(tracking.experiment)
    artifact_root = Path(tracking.artifact_root).resolve()
    artifact_root.mkdir(parents=True, exist_ok=True)
    return mlflow.create_experiment(tracking.experiment, artifact_location=artifact_root.as_uri())


def earlier_attempts(client, experiment_id: str, key: str) -> list:
    """The runs (pipeline runs and their nested stage runs) logged before under this run key."""
    return client.search_runs([experiment_id], filter_string=f"tags.{RUN_KEY_TAG} = '{key}'", max_results=1000)


def step_metrics(log_history: list[dict], prefix: str = "train_") -> list[tuple[str, float, int]]:
    """(name, value, step) for every number the trainer logged during training (loss, its parts,
    learning rate, grad norm, active dims, evaluations during training); the end-of-training
    summary carries no per-step value."""
    return [(mlflow_metric_name(prefix + key), float(value), entry["step"])
            for entry in log_history if "train_runtime" not in entry
            for key, value in entry.items()
            if key not in {"step", "epoch"} and isinstance(value, (int, float)) and math.isfinite(value)]


def log_pipeline_run(records: dict[str, dict], params: Params, tags: dict[str, str], artifacts: list[Path],
                     datasets: list[tuple[Any, str]] = (), status: str = "FINISHED") -> str:
    """One MLflow run holding every param, every stage's metrics and emissions, the training curve at
    step resolution and the given artifacts (the runs of a sweep compare column by column), with a
    nested run per stage holding that stage's own; `datasets` are (mlflow.data dataset, context)
    pairs logged as the run's inputs. `tags` go on every run.

    Exactly one run per run key (tags["run_key"]): a finished run already logged under the key with
    the same outcome is kept and returned (a rerun after a failure further on); other earlier
    attempts (cut short by a crash or a lost server, or stopped) are deleted once this one is in."""
    import mlflow

    experiment_id = configure_mlflow(params.tracking)
    client = mlflow.MlflowClient()
    earlier = earlier_attempts(client, experiment_id, tags[RUN_KEY_TAG])
    done = [r for r in earlier if "mlflow.parentRunId" not in r.data.tags and r.info.status == status == "FINISHED"
            and r.data.tags.get(OUTCOME_TAG) == tags.get(OUTCOME_TAG)]
    run_id = done[0].info.run_id if done else new_pipeline_run(experiment_id, records, params, tags, artifacts,
                                                               datasets, status)
    for attempt in earlier:
        if run_id not in (attempt.info.run_id, attempt.data.tags.get("mlflow.parentRunId")):
            client.delete_run(attempt.info.run_id)
    if done:
        log.info("run key %s: run %s already logged, kept", tags[RUN_KEY_TAG], run_id)
    return run_id


def pipeline_started_at(client, experiment_id: str, records: dict[str, dict], key: str) -> float | None:
    """When this pipeline run began: the first start among the stages that ran after the previous
    pipeline run in the experiment ended (a stage DVC skipped keeps its record, and its time, from
    that run or an earlier one); None when none did (track alone ran: the run starts now)."""
    previous = next((run.info.end_time / 1000 for run in client.search_runs(
        [experiment_id], order_by=["attributes.end_time DESC"], max_results=200)
        if "mlflow.parentRunId" not in run.data.tags and run.data.tags.get(RUN_KEY_TAG) != key
        and run.info.end_time), 0.0)
    starts = [r["started_at"] for r in records.values() if r.get("started_at", 0) > previous]
    return min(starts) if starts else None


def headline_first(metrics: dict[str, float], params: Params) -> dict[str, float]:
    """The gate's metric first: the MLflow UI's compare view plots the first metric a run logged."""
    headline = mlflow_metric_name(f"evaluate.{params.push.gate.metric}")
    return {headline: metrics[headline], **metrics} if headline in metrics else metrics


def new_pipeline_run(experiment_id: str, records: dict[str, dict], params: Params, tags: dict[str, str],
                     artifacts: list[Path], datasets: list[tuple[Any, str]], status: str) -> str:
    import mlflow
    from mlflow.entities import Metric, Param

    client = mlflow.MlflowClient()
    started_at = pipeline_started_at(client, experiment_id, records, tags[RUN_KEY_TAG])
    created = client.create_run(experiment_id, tags=tags,
                                start_time=None if started_at is None else int(started_at * 1000))
    with mlflow.start_run(run_id=created.info.run_id) as run:
        flat = _flatten_sections(params.model_dump(mode="json", by_alias=True))
        mlflow.log_params({k: ("" if v is None else v) for k, v in flat.items()})

        metrics: dict[str, float] = {}
        for stage, record in records.items():
            for name, value in record["metrics"].items():
                metrics[mlflow_metric_name(f"{stage}.{name}")] = float(value)
            metrics[f"{stage}.seconds"] = record["seconds"]
            metrics[f"{stage}.energy_kwh"] = record["energy_kwh"]
            metrics[f"{stage}.emissions_kg_co2eq"] = record["emissions_kg_co2eq"]
        metrics["emissions_kg_co2eq"] = sum(r["emissions_kg_co2eq"] for r in records.values())
        metrics["energy_kwh"] = sum(r["energy_kwh"] for r in records.values())
        mlflow.log_metrics(headline_first(metrics, params))
        for stage, record in records.items():  # a nested run per stage, over the stage's own time
            stage_tags = {k: v for k, v in tags.items() if k != "mlflow.runName"}
            nested = client.create_run(experiment_id, run_name=stage, start_time=_ms(record, "started_at"),
                                       tags={**stage_tags, "stage": stage, "mlflow.parentRunId": run.info.run_id})
            now = int(time.time() * 1000)
            client.log_batch(nested.info.run_id,
                             params=[Param(k, str("" if v is None else v)) for k, v in _flatten(stage, record["params"]).items()],
                             metrics=[Metric(k.split(".", 1)[1], v, now, 0) for k, v in metrics.items()
                                      if k.startswith(f"{stage}.")])
            client.set_terminated(nested.info.run_id, end_time=_ms(record, "finished_at"))

    # the training curve: one request per 1000 points (MLflow's batch limit), not one per step
        now = int(time.time() * 1000)
        points = [Metric(name, value, now, step) for name, value, step in
                  step_metrics(records["train"]["facts"]["log_history"] if "train" in records else [])]
        for start in range(0, len(points), 1000):
            mlflow.MlflowClient().log_batch(run.info.run_id, metrics=points[start:start + 1000])

        for dataset, context in datasets:
            mlflow.log_input(dataset, context=context)

        for path in artifacts:
            if path.is_dir():
                mlflow.log_artifacts(str(path), artifact_path=path.name)
            elif path.exists():
                mlflow.log_artifact(str(path))
    if status != "FINISHED":
        mlflow.MlflowClient().set_terminated(run.info.run_id, status)
    return run.info.run_id
