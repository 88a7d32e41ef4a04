"""Stage 7: publish the model and its card to the Hugging Face Hub in one commit.

Always writes build/push/ (exactly the files that are uploaded) and build/push_plan.json (repo,
revision, commit message, files with sizes and sha256). Uploads only when push.dry_run is false,
with the token from the HF_TOKEN environment variable, which is never logged or written.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from pathlib import Path

from pipeline.cli import StageError, stage_main
from pipeline.config import CARD_DIR, PUSH_DIR, STUDENT_DIR, Params
from pipeline.tracking import stage_record, write_json

PLAN_FILE = Path("build/push_plan.json")


def git_revision() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def stage_upload_folder(out_dir: Path = PUSH_DIR) -> list[dict]:
    """Model files plus the rendered card, nothing else (no checkpoints, no logs)."""
    shutil.rmtree(out_dir, ignore_errors=True)
    shutil.copytree(STUDENT_DIR, out_dir)
    shutil.copy(CARD_DIR / "README.md", out_dir / "README.md")
    return [{"path": p.relative_to(out_dir).as_posix(), "bytes": p.stat().st_size,
             "sha256": hashlib.sha256(p.read_bytes()).hexdigest()}
            for p in sorted(out_dir.rglob("*")) if p.is_file()]


def upload(params: Params, folder: Path, message: str) -> str:
    from huggingface_hub import HfApi

    token = os.environ.get("HF_TOKEN")
    if not token:
        raise StageError("push.dry_run is false but HF_TOKEN is not set in the environment")
    api = HfApi(token=token)
    cfg = params.push
    api.create_repo(cfg.repo_id, private=cfg.private, exist_ok=True)
    commit = api.upload_folder(repo_id=cfg.repo_id, folder_path=str(folder),
                               revision=cfg.revision, commit_message=message)
    return commit.oid


def run(params: Params) -> dict:
    cfg = params.push
    with stage_record("push", cfg, params.tracking) as record:
        files = stage_upload_folder()
        message = f"Upload {params.card.model_name} (sparse-pipeline, git {git_revision()})"
        plan = {"repo_id": cfg.repo_id, "revision": cfg.revision, "private": cfg.private,
                "dry_run": cfg.dry_run, "commit_message": message, "folder": str(PUSH_DIR),
                "files": files, "commit": None}
        if not cfg.dry_run:
            plan["commit"] = upload(params, PUSH_DIR, message)
        write_json(PLAN_FILE, plan)
        record["metrics"] = {"files": len(files), "bytes": sum(f["bytes"] for f in files)}
        record["facts"] = {"plan": plan}
    return plan


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
