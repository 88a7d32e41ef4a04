"""Stage 0: a link to each local file and folder the params name, so that DVC re-runs the stages
that read one when its contents change.

dvc.yaml cannot list a dependency that only some params have (a local model folder, where another
run names a Hub id or the synthetic student), but DVC follows a link when it hashes a dependency.
So this stage writes inputs/<slot> for every slot below: a link to the file or folder the params
name, or, where they name something that is not local, a one-line file saying what (a Hub id at its
revision, "synthetic", "none"). Each stage depends on its slots in dvc.yaml. The stage re-runs when
those params change; an edit inside a linked folder re-runs the stages that read it, and only them.
inputs/ is committed with dvc.lock: a relative link resolves the same way in every clone.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from pipeline.cli import StageError, stage_main
from pipeline.config import INPUTS_DIR, Params


def slots(params: Params) -> dict[str, tuple[str | None, str | None]]:
    """slot -> (what the params name, its Hub revision)."""
    train, evaluation = params.snapshot.train, params.snapshot.eval
    return {"train_data": (train.source, train.revision),
            "train_corpus": (train.corpus, None),
            "train_queries": (train.queries, None),
            "eval_data": (evaluation.source, evaluation.revision),
            "teacher_model": (params.teacher.model, params.teacher.revision),
            "base_model": (params.train.base_model, params.train.revision)}


def write_slot(folder: Path, slot: str, named: str | None, revision: str | None) -> str:
    """inputs/<slot>: a link, or a line naming what is not local; returns what it wrote."""
    target = folder / slot
    if named is not None and Path(named).exists():
        # relative where the params are: the clone's layout, not this machine's, decides
        os.symlink(named if os.path.isabs(named) else os.path.relpath(named, folder), target)
        return f"link to {named}"
    if named is not None and named != "synthetic" and named.startswith((".", "/", "~")):
        raise StageError(f"{named} (named by the params, inputs/{slot}) is neither a file nor a folder")
    text = "none" if named is None else named if named == "synthetic" else f"hub: {named} @ {revision}"
    target.write_text(text + "\n")
    return text


def run(params: Params) -> dict:
    shutil.rmtree(INPUTS_DIR, ignore_errors=True)  # links only: their targets are never followed
    INPUTS_DIR.mkdir(parents=True)
    return {slot: write_slot(INPUTS_DIR, slot, *value) for slot, value in slots(params).items()}


def main(argv: list[str] | None = None) -> None:
    stage_main(run, __doc__, argv)


if __name__ == "__main__":
    main()
