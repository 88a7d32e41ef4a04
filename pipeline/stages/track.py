"""Stage 8: one MLflow run for this pipeline execution, and the model in the registry.

Gathers every stage's record (params, metrics, time, energy), the training loss curve at step
resolution, and the card, metrics, validation report, manifest and push plan as artifacts, with a
nested run per stage; every run is tagged with the git revision, the dvc.lock hash and the identity
of its evaluation (eval.id, eval.source, eval.revision, eval.split, eval.sets, eval.sha256), and
outcome=ok (a run that a stage stopped is put into MLflow by that stage, tagged refused or failed).
Registers the student (pipeline.tracking.registry: alias challenger, and champion-<eval id> when it passes
the gate against that champion), and logs the gate's verdict (gate_verdict.json, report.md: the
intervals and the queries that gained and lost most against the champion; tags gate.*). Writes the run id and the registration to
records/mlflow_run.json. Runs go to tracking.tracking_uri, or to MLFLOW_TRACKING_URI when that is set
(a shared server, in CI from a secret); a server that does not answer fails the stage naming it,
after a bounded number of retries, and a rerun logs the run exactly once.
"""

from __future__ import annotations

import json
import warnings

import pandas as pd

from pipeline.cli import stage_main
from pipeline.config import (
    EVAL_METRICS,
    PER_QUERY,
    RECORDED_STAGES,
    RECORDS_DIR,
    Params,
)
from pipeline.data.snapshots import (
    TrainingSnapshot,
    read_eval_snapshot,
    read_manifest,
)
from pipeline.evaluation import report, stats
from pipeline.evaluation.gate import (
    GateScores,
    query_texts,
    read_per_query,
    scores_from_evaluation,
)
from pipeline.tracking import registry
from pipeline.tracking.records import (
    OUTCOME_TAG,
    STAGE_ARTIFACTS,
    evaluation_identity,
    is_server,
    load_records,
    log_pipeline_run,
    main_result_name,
    mlflow_server_calls,
    pipeline_tags,
    shown_uri,
    tracking_uri,
    write_json,
)

RUN_FILE = RECORDS_DIR / "mlflow_run.json"


def training_dataset(manifest: dict):
    """The snapshot as an mlflow.data dataset, named by its source and carrying its content hash."""
    import mlflow.data

    train = manifest["train"]
    source = train["source"] + (f"@{train['revision']}" if train["revision"] else "")
    with warnings.catch_warnings():  # "synthetic" or a Hub id reads as several source types
        warnings.simplefilter("ignore", UserWarning)
        # MLflow keeps at most 36 characters of a digest
        # Arrow-backed columns: no Python object per row (MS MARCO's sets have tens of millions)
        rows = TrainingSnapshot().table.to_pandas(types_mapper=pd.ArrowDtype)
        return mlflow.data.from_pandas(rows, source=source, name=f"train ({train['kind']})",
                                       digest=train["sha256"][:36])


def gate_inputs(params: Params) -> tuple[GateScores, dict]:
    """What the registry's gate reads: this run's numbers (and per-query values), and the identity
    of their evaluation."""
    manifest = read_manifest()
    scores = scores_from_evaluation(json.loads(EVAL_METRICS.read_text()), params.push.gate,
                                    main_result_name(manifest), read_per_query(PER_QUERY))
    return scores, evaluation_identity(manifest)


def verdict_tags(verdict: dict) -> dict[str, str]:
    """The gate's verdict as run tags: rule, passed, reason, and each comparison's difference,
    interval and p-value."""
    tags = {"gate.rule": verdict["rule"], "gate.passed": str(verdict["passed"]).lower(),
            "gate.reason": verdict["reason"][:5000]}
    for name, side in (("vs_base", "p_greater"), ("vs_champion", "p_less")):
        if name in verdict:
            diff = verdict[name]
            tags[f"gate.{name}"] = f"{stats.shown(diff)}, {diff['queries']} queries, one-sided p = {diff[side]:.4g}"
    return tags


def run(params: Params) -> dict:
    """Log and register, each MLflow call retried at most a few times: a server that stays down
    fails the stage naming it, and the rerun logs the run once (pipeline.tracking.records's run key)."""
    with mlflow_server_calls(params.tracking, "Nothing was registered; rerun when it is back, the run is logged once"):
        return log_and_register(params)


def log_and_register(params: Params) -> dict:
    import mlflow

    records = load_records(list(RECORDED_STAGES))
    tags = {**pipeline_tags(params, records), OUTCOME_TAG: "ok"}
    artifacts = [path for stage in records for path in STAGE_ARTIFACTS.get(stage, [])]
    run_id = log_pipeline_run(records, params, tags, artifacts, [(training_dataset(read_manifest()), "training")])
    texts = query_texts(read_eval_snapshot())
    registered = registry.register(run_id, params.tracking.registered_model, params.push.gate, *gate_inputs(params),
                                   params.evaluate.intervals, texts)
    client = mlflow.MlflowClient()
    verdict = registered["verdict"]
    client.log_dict(run_id, verdict, "gate_verdict.json")
    evaluation = json.loads(EVAL_METRICS.read_text())
    client.log_text(run_id, report.markdown(evaluation, verdict), "report.md")
    for key, value in {**verdict_tags(verdict), "registry": f"{registered['name']} version {registered['version']}, "
                       + (registered["alias"] if registered["promoted"] else "challenger"),
                       "mlflow.note.content": report.summary(evaluation, verdict)}.items():  # the run's description
        client.set_tag(run_id, key, value)
    uri = shown_uri(tracking_uri(params.tracking))
    out = {"run_id": run_id, "experiment": params.tracking.experiment, "tracking_uri": uri, "registered": registered}
    write_json(RUN_FILE, out)
    print(f"MLflow run {run_id} in experiment {params.tracking.experiment!r} ({uri}); see it "
          + (f"at {uri}" if is_server(uri) else f"with: mlflow ui --backend-store-uri {uri}"))
    print(f"registered {registered['name']} version {registered['version']} (challenger); "
          + (f"{registered['alias']}: {registered['reason']}" if registered["promoted"]
             else f"not champion: {registered['reason']}"))
    if "not_compared" in registered:
        print(registered["not_compared"])
    return out


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
