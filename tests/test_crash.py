"""Crash safety, injected: each stage that writes data (snapshot, teacher, train, evaluate) is
killed with SIGKILL while one of its outputs is being written (a temporary file or folder exists
beside it; the test retries until two kills land so), and run against a full disk
(a file-size limit, RLIMIT_FSIZE: every write past it fails as on a full disk). Each time: the stage
fails (the full disk with a message, no traceback), no partial output is left to be read as whole,
and the rerun's outputs equal an uninterrupted run's, byte for byte."""

from __future__ import annotations

import hashlib
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from pipeline.config import (
    BASE_MODEL_DIR,
    EVAL_METRICS,
    NDCG_TABLE,
    PLOTS_DIR,
    SNAPSHOT_DIR,
    STUDENT_DIR,
    TEACHER_SCORED,
    TRAIN_LOSS,
    Params,
)
from pipeline.stages import evaluate, snapshot, teacher, train, validate

STAGES = {"snapshot": snapshot, "validate": validate, "teacher": teacher, "train": train, "evaluate": evaluate}
ORDER = list(STAGES)
# what each stage writes that an uninterrupted rerun reproduces byte for byte (records hold timings)
OUTPUTS = {
    "snapshot": [SNAPSHOT_DIR],
    "teacher": [TEACHER_SCORED],
    "train": [BASE_MODEL_DIR / "model.safetensors", STUDENT_DIR / "model.safetensors", TRAIN_LOSS],
    "evaluate": [EVAL_METRICS, NDCG_TABLE, PLOTS_DIR / "ndcg_per_dataset.png",
                 PLOTS_DIR / "document_active_dims.png"],
}


KILL_ATTEMPTS = 20


def temporaries(stage: str) -> list[Path]:
    """The temporary files and folders beside the stage's outputs: what it is writing right now
    (pipeline.tracking.records writes `.<name>.<random>.tmp` and renames it when whole)."""
    folders = {path.parent for path in OUTPUTS[stage]}
    return [found for folder in folders if folder.is_dir() for found in folder.glob(".*.tmp")]


def contents(paths: list[Path]) -> dict[str, str]:
    """sha256 of every file under the paths, by path."""
    files = [f for p in paths for f in ([p] if p.is_file() else sorted(p.rglob("*")) if p.is_dir() else [])
             if f.is_file()]
    return {str(f): hashlib.sha256(f.read_bytes()).hexdigest() for f in files}


def remove(paths: list[Path]) -> None:
    for path in paths:
        shutil.rmtree(path) if path.is_dir() else path.unlink(missing_ok=True)
    for folder in {STUDENT_DIR, BASE_MODEL_DIR} & {p.parent for p in paths}:
        shutil.rmtree(folder, ignore_errors=True)


def start(stage: str, file_size_limit: int | None = None) -> subprocess.Popen:
    def limit_file_size():  # writes past the limit fail with EFBIG instead of killing the process
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (file_size_limit, file_size_limit))

    return subprocess.Popen([sys.executable, "-m", f"pipeline.stages.{stage}", "--params", "params.yaml"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            preexec_fn=limit_file_size if file_size_limit else None)


def assert_nothing_partial(stage: str, reference: dict[str, str]) -> None:
    """Whatever the failed run left is complete: a file equal to the uninterrupted run's, a folder
    with all of its files."""
    left = contents(OUTPUTS[stage])
    assert all(reference[path] == digest for path, digest in left.items()), \
        [p for p, d in left.items() if reference.get(p) != d]
    for folder in (SNAPSHOT_DIR, STUDENT_DIR, BASE_MODEL_DIR):
        if folder.is_dir():  # these folders are swapped in whole, or not at all
            assert {p for p in reference if Path(p).is_relative_to(folder)} <= set(left), f"{folder} is partial"


# the default suite crashes the snapshot; the rest run with -m slow (a teacher killed mid-scoring is
# also tested in the default suite, by tests/test_teacher.py, as is a training killed mid-way)
@pytest.mark.parametrize("stage", ["snapshot"] + [pytest.param(stage, marks=pytest.mark.slow)
                                                  for stage in ("teacher", "train", "evaluate")])
def test_killed_and_disk_full_stage_leaves_nothing_partial_and_rerun_equals_uninterrupted(
        stage, workdir, tiny_params):
    data = tiny_params.model_dump(by_alias=True)
    data["train"]["save_steps"] = 5
    params = Params.model_validate(data)
    (workdir / "params.yaml").write_text(yaml.safe_dump(params.model_dump(by_alias=True, mode="json")))
    for earlier in ORDER[:ORDER.index(stage)]:
        STAGES[earlier].run(params)
    STAGES[stage].run(params)
    reference = contents(OUTPUTS[stage])
    assert reference

    # a full disk: the limit is half the largest output, so writing that one must fail
    largest = max(Path(path).stat().st_size for path in reference)
    remove(OUTPUTS[stage])
    process = start(stage, file_size_limit=largest // 2)
    _, stderr = process.communicate(timeout=600)
    assert process.returncode == 1, stderr
    assert "the disk refused a write" in stderr and "Traceback" not in stderr, stderr[-2000:]
    assert_nothing_partial(stage, reference)

    # kill -9 mid-write: the moment a temporary output exists (a file or folder being written aside),
    # retried until the kill lands while one is still there, i.e. before its rename
    landed = 0
    for _ in range(KILL_ATTEMPTS):
        remove(OUTPUTS[stage])
        for stale in temporaries(stage):
            shutil.rmtree(stale) if stale.is_dir() else stale.unlink()
        process = start(stage)
        while process.poll() is None and not temporaries(stage):
            time.sleep(0.0005)
        process.send_signal(signal.SIGKILL)  # kill -9
        process.wait()
        if process.returncode == -signal.SIGKILL and temporaries(stage):
            landed += 1
            assert_nothing_partial(stage, reference)
            if landed == 2:
                break
    assert landed == 2, f"{stage}: the kill landed mid-write {landed} times in {KILL_ATTEMPTS} attempts"

    STAGES[stage].run(params)  # the rerun
    assert contents(OUTPUTS[stage]) == reference
