"""Stage 7: publish the model and its card to the Hugging Face Hub in one commit, safely.

Always writes build/push/ (exactly the files that are uploaded: the model, the card and its figures)
and build/push_plan.json (repo, branch, commit message with the git SHA and the dvc.lock hash, files
with sizes and sha256, the intervals, the evaluation gate's verdict). The gate comes first
(pipeline.evaluation.gate): under push.gate.rule significance, against the registry's champion of the same
evaluation (read from the MLflow store the run tracks to: the verdict track will promote by), under
threshold against the card already on the branch (when that card was measured on the same
evaluation). A refused model is not pushed: the plan says why, the stage fails naming the test,
the difference, its interval and p-value (and BM25's figure), and the run goes to MLflow tagged
outcome=refused. Uploads only when push.dry_run is
false, with the token from the HF_TOKEN environment variable (never logged or written), to the
endpoint in HF_ENDPOINT if set; Hub calls failing with a 5xx, a 429 or a timeout are retried with
exponential backoff (upload_folder skips files already committed, so a retry after a lost answer
makes no second commit).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from pipeline.cli import StageError, stage_main
from pipeline.config import (
    CARD_DIR,
    EVAL_METRICS,
    EXPORT_DIR,
    PER_QUERY,
    PUSH_DIR,
    PUSH_PLAN,
    STUDENT_DIR,
    Params,
    PushConfig,
)
from pipeline.data.snapshots import read_eval_snapshot, read_manifest
from pipeline.evaluation.gate import (
    Champion,
    GateRefused,
    GateScores,
    check_gate,
    comparable_previous,
    query_texts,
    read_per_query,
    scores_from_evaluation,
)
from pipeline.tracking import registry
from pipeline.tracking.records import (
    dvc_lock_hash,
    evaluation_identity,
    git_revision,
    main_result_name,
    mlflow_server_calls,
    stage_record,
    tracking_uri,
    write_json,
)

log = logging.getLogger(__name__)


def stage_upload_folder(out_dir: Path = PUSH_DIR) -> list[dict]:
    """Model files (with the export stage's ONNX files in their places) plus the rendered card and its
    figures, nothing else (no checkpoints, no logs)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(STUDENT_DIR, out_dir)
    if EXPORT_DIR.exists():
        shutil.copytree(EXPORT_DIR, out_dir, dirs_exist_ok=True)
    for path in CARD_DIR.iterdir():
        shutil.copy(path, out_dir / path.name)
    return [{"path": p.relative_to(out_dir).as_posix(), "bytes": p.stat().st_size,
             "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            for p in sorted(out_dir.rglob("*")) if p.is_file()]


def transient(error: Exception) -> bool:
    """A Hub answer worth retrying: a server error, rate limiting, a timeout or a dropped connection."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError

    if isinstance(error, HfHubHTTPError) and error.response is not None:
        return error.response.status_code >= 500 or error.response.status_code == 429
    return isinstance(error, (httpx2.TimeoutException, httpx2.NetworkError))


def with_retries(call, what: str, cfg: PushConfig):
    for attempt in range(1, cfg.attempts + 1):
        try:
            return call()
        except Exception as error:
            if attempt == cfg.attempts or not transient(error):
                raise
            delay = cfg.backoff_seconds * 2 ** (attempt - 1)
            log.warning("%s failed (%s: %s); retry %d of %d in %.2f s", what, type(error).__name__,
                        str(error).splitlines()[0][:200], attempt, cfg.attempts - 1, delay)
            time.sleep(delay)


def pushed_card(api, cfg: PushConfig) -> str | None:
    """The card on the branch now, or None when there is no repo, branch or card yet."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    # a fresh cache: huggingface_hub falls back to a cached copy when the Hub has none, and a card
    # cached from another push must not be taken for the one on the branch now
    with tempfile.TemporaryDirectory() as cache:
        try:
            path = with_retries(lambda: api.hf_hub_download(cfg.repo_id, "README.md", revision=cfg.revision,
                                                            cache_dir=cache), "reading the pushed card", cfg)
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError):
            return None
        return Path(path).read_text(encoding="utf-8")


def upload(api, cfg: PushConfig, folder: Path, message: str, description: str) -> str:
    with_retries(lambda: api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True), "create_repo", cfg)
    if cfg.revision != "main":
        with_retries(lambda: api.create_branch(cfg.repo_id, branch=cfg.revision, exist_ok=True),
                     "create_branch", cfg)
    commit = with_retries(lambda: api.upload_folder(repo_id=cfg.repo_id, folder_path=str(folder),
                                                    revision=cfg.revision, commit_message=message,
                                                    commit_description=description), "upload_folder", cfg)
    return commit.oid


def registry_verdict(params: Params, scores: GateScores, identity: dict, texts: dict) -> dict:
    """The gate's verdict against the registry's champion of this evaluation (what track will
    promote by), read from the MLflow store the run tracks to."""
    import mlflow

    mlflow.set_tracking_uri(tracking_uri(params.tracking))
    with mlflow_server_calls(params.tracking, "The gate compares with the champion there: nothing was pushed; "
                                              "rerun when it is back"):
        return registry.gate_verdict(mlflow.MlflowClient(), params.tracking.registered_model, params.push.gate,
                                     scores, identity["id"], params.evaluate.intervals, texts, "pushing")


def card_verdict(params: Params, scores: GateScores, previous: dict, texts: dict) -> dict:
    """push.gate.rule threshold: the verdict against the card on the branch, when comparable."""
    champion = Champion("the pushed model", previous["value"]) if previous["compared"] else None
    try:
        return check_gate(params.push.gate, scores, champion, params.evaluate.intervals, texts)
    except GateRefused as refused:
        return refused.verdict


def run(params: Params) -> dict:
    cfg = params.push
    with stage_record("push", params) as record:
        evaluation = json.loads(EVAL_METRICS.read_text())
        manifest = read_manifest()
        identity = evaluation_identity(manifest)
        dataset = main_result_name(manifest)
        scores = scores_from_evaluation(evaluation, cfg.gate, dataset, read_per_query(PER_QUERY))
        texts = query_texts(read_eval_snapshot())
        message = f"Upload {params.card.model_name} (git {git_revision()}, dvc.lock {dvc_lock_hash()})"
        description = f"{cfg.gate.metric} on {dataset}: {scores.value:.4f}. Pushed by sparse-pipeline."
        plan = {"repo_id": cfg.repo_id, "revision": cfg.revision, "private": cfg.private,
                "dry_run": cfg.dry_run, "commit_message": message, "commit_description": description,
                "folder": str(PUSH_DIR), "files": [], "commit": None, "eval_id": identity["id"],
                "intervals": {"queries": evaluation["queries"], "student": evaluation["intervals"]["student"],
                              **evaluation["differences"]}}
        api, previous = None, {"value": None, "compared": False, "reason": "a dry run reads no pushed card"}
        if not cfg.dry_run:
            from huggingface_hub import HfApi

            token = os.environ.get("HF_TOKEN")
            if not token:
                raise StageError("push.dry_run is false but HF_TOKEN is not set in the environment")
            api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token)
            previous = comparable_previous(pushed_card(api, cfg), cfg.gate.metric, identity["id"])
        plan["previous"] = previous
        plan["gate"] = (registry_verdict(params, scores, identity, texts) if cfg.gate.rule == "significance"
                        else card_verdict(params, scores, previous, texts))
        if not plan["gate"]["passed"]:
            write_json(PUSH_PLAN, plan)
            raise GateRefused(plan["gate"]["reason"], plan["gate"])
        plan["files"] = stage_upload_folder()
        if api is not None:
            plan["commit"] = upload(api, cfg, PUSH_DIR, message, description)
            log.info("pushed %d files to %s@%s: commit %s", len(plan["files"]), cfg.repo_id, cfg.revision,
                     plan["commit"])
        write_json(PUSH_PLAN, plan)
        record["metrics"] = {"files": len(plan["files"]), "bytes": sum(f["bytes"] for f in plan["files"])}
        record["facts"] = {"plan": plan}
    return plan


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
