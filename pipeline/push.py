"""Stage 7: publish the model and its card to the Hugging Face Hub in one commit, safely.

Always writes build/push/ (exactly the files that are uploaded: the model, the card and its figures)
and build/push_plan.json (repo, branch, commit message with the git SHA and the dvc.lock hash, files
with sizes and sha256, the evaluation gate's numbers). The gate comes first: a model whose card's
main result is below push.gate.minimum, or more than push.gate.max_drop below the card already on the
branch, is not pushed, and the stage fails giving both numbers. Uploads only when push.dry_run is
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
import subprocess
import tempfile
import time
from pathlib import Path

from pipeline.cli import StageError, stage_main
from pipeline.config import CARD_DIR, PUSH_DIR, STUDENT_DIR, GateConfig, Params, PushConfig
from pipeline.tracking import stage_record, write_json

PLAN_FILE = Path("build/push_plan.json")
DVC_LOCK = Path("dvc.lock")

log = logging.getLogger(__name__)


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


def stage_upload_folder(out_dir: Path = PUSH_DIR) -> list[dict]:
    """Model files plus the rendered card and its figures, nothing else (no checkpoints, no logs)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(STUDENT_DIR, out_dir)
    for path in CARD_DIR.iterdir():
        shutil.copy(path, out_dir / path.name)
    return [{"path": p.relative_to(out_dir).as_posix(), "bytes": p.stat().st_size,
             "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            for p in sorted(out_dir.rglob("*")) if p.is_file()]


def main_result(card_text: str, metric: str) -> tuple[str, float] | None:
    """(dataset name, value) of the first model-index result for `metric` on a card: its main one."""
    from huggingface_hub import ModelCard

    for result in ModelCard(card_text).data.eval_results or []:
        if result.metric_type == metric:
            return result.dataset_name, float(result.metric_value)
    return None


def check_gate(gate: GateConfig, dataset: str, value: float, previous: float | None,
               previous_name: str = "the pushed model", action: str = "pushing") -> dict:
    """The gate's numbers; raises StageError naming both when `value` (of gate.metric on `dataset`)
    is below the minimum or more than max_drop below `previous` (None: nothing to compare with)."""
    verdict = {"metric": gate.metric, "dataset": dataset, "value": value, "minimum": gate.minimum,
               "max_drop": gate.max_drop, "previous": previous}
    if gate.minimum is not None and value < gate.minimum:
        raise StageError(f"evaluation gate: {gate.metric} on {dataset} is {value:.4f}, below "
                         f"push.gate.minimum {gate.minimum:.4f}; not {action}")
    if previous is not None and gate.max_drop is not None and value < previous - gate.max_drop:
        raise StageError(f"evaluation gate: {gate.metric} on {dataset} is {value:.4f}, "
                         f"{previous - value:.4f} below {previous_name}'s {previous:.4f} "
                         f"(push.gate.max_drop {gate.max_drop}); not {action}")
    return verdict


def previous_value(card_text: str | None, metric: str, dataset: str) -> float | None:
    """The pushed card's main result for `metric`, if it is on the same dataset."""
    previous = main_result(card_text, metric) if card_text else None
    return previous[1] if previous and previous[0] == dataset else None


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
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

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


def run(params: Params) -> dict:
    cfg = params.push
    with stage_record("push", cfg, params.tracking) as record:
        ours = main_result((CARD_DIR / "README.md").read_text(encoding="utf-8"), cfg.gate.metric)
        if ours is None:
            raise StageError(f"push.gate.metric {cfg.gate.metric!r} is not among the card's results")
        files = stage_upload_folder()
        message = f"Upload {params.card.model_name} (git {git_revision()}, dvc.lock {dvc_lock_hash()})"
        description = f"{cfg.gate.metric} on {ours[0]}: {ours[1]:.4f}. Pushed by sparse-pipeline."
        plan = {"repo_id": cfg.repo_id, "revision": cfg.revision, "private": cfg.private,
                "dry_run": cfg.dry_run, "commit_message": message, "commit_description": description,
                "folder": str(PUSH_DIR), "files": files, "commit": None}
        if cfg.dry_run:  # no Hub: the minimum is checked, the pushed model is not read
            plan["gate"] = check_gate(cfg.gate, *ours, previous=None)
        else:
            from huggingface_hub import HfApi

            token = os.environ.get("HF_TOKEN")
            if not token:
                raise StageError("push.dry_run is false but HF_TOKEN is not set in the environment")
            api = HfApi(endpoint=os.environ.get("HF_ENDPOINT"), token=token)
            previous = previous_value(pushed_card(api, cfg), cfg.gate.metric, ours[0])
            plan["gate"] = check_gate(cfg.gate, *ours, previous=previous)
            plan["commit"] = upload(api, cfg, PUSH_DIR, message, description)
            log.info("pushed %d files to %s@%s: commit %s", len(files), cfg.repo_id, cfg.revision, plan["commit"])
        write_json(PLAN_FILE, plan)
        record["metrics"] = {"files": len(files), "bytes": sum(f["bytes"] for f in files)}
        record["facts"] = {"plan": plan}
    return plan


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
