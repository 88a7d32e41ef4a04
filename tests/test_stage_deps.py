"""What DVC sees: every stage depends on the pipeline modules it imports (directly or through others)
and on the local files and folders its params name (through inputs/), no stage imports another, and
the committed dvc.lock matches dvc.yaml and the code."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import subprocess
from pathlib import Path

import yaml

from pipeline.config import INPUTS_DIR, Params
from tests.helpers.module_graph import (
    STAGES,
    all_modules,
    expected_module_deps,
    importers,
    module_closure,
    module_path,
    stage_module,
)
from tests.helpers.project import (
    BIN,
    ENV,
    PROJECT,
    USER_DATA_TEACHER,
    make_project_copy,
)


def test_every_stage_depends_on_exactly_the_modules_it_imports():
    for stage, definition in STAGES.items():
        listed = {d for d in definition["deps"] if d.startswith("pipeline/") and d.endswith(".py")}
        expected = expected_module_deps(stage)
        assert listed == expected, (f"dvc.yaml stage {stage}: add {sorted(expected - listed)}, "
                                    f"remove {sorted(listed - expected)}")


def test_the_stage_modules_are_the_stages_folder():
    assert {stage_module(stage) for stage in STAGES} == {m for m in all_modules() if m.startswith("stages.")}


def test_no_stage_imports_another_stage():
    stage_modules = {stage_module(stage) for stage in STAGES}
    for stage in STAGES:
        others = module_closure(stage_module(stage)) & stage_modules - {stage_module(stage)}
        assert not others, f"{module_path(stage_module(stage))} imports the stage module(s) {sorted(others)}"


def test_no_library_module_or_bench_imports_a_stage():
    """Stage modules are entry points (their CLI, the flow and tests call them); what a bench or
    another module needs lives in library code."""
    stage_modules = {stage_module(stage) for stage in STAGES}
    for module in all_modules() - stage_modules:
        assert not module_closure(module) & stage_modules, f"{module_path(module)} imports a stage module"
    for bench in (PROJECT / "bench").glob("*.py"):
        tree = ast.parse(bench.read_text())
        named = {f"{n.module}.{a.name}" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module
                 for a in n.names} | {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not {m for m in named if m.startswith("pipeline.stages.")}, f"{bench.name} imports a stage module"


def test_test_modules_import_no_other_test_module():
    """Each test module stands alone (it passes alone and in any order); what tests share lives in
    tests/helpers/, and conftest.py holds fixtures only."""
    for path in [*PROJECT.glob("tests/*.py"), *PROJECT.glob("tests/helpers/*.py")]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            for name in names:
                assert not name.startswith("tests.") or name.startswith("tests.helpers."), \
                    f"{path.relative_to(PROJECT)} imports {name}: move what it needs to tests/helpers/"


def test_every_module_belongs_to_a_stage():
    for module in all_modules():
        assert importers(module_path(module)), f"no stage imports {module_path(module)}: dead code?"


def test_the_committed_dvc_lock_is_in_step_with_dvc_yaml_and_the_code():
    """dvc.lock is the record of the last run of the committed pipeline: every stage with the same
    command, deps, params and outs as dvc.yaml, and the code it ran is the code committed."""
    lock = yaml.safe_load((PROJECT / "dvc.lock").read_text())["stages"]
    params = yaml.safe_load((PROJECT / "params.yaml").read_text())
    assert set(lock) == set(STAGES)
    for stage, definition in STAGES.items():
        entry = lock[stage]
        assert entry["cmd"] == definition["cmd"], stage
        assert sorted(d["path"] for d in entry["deps"]) == sorted(definition["deps"]), stage
        declared = [next(iter(o)) if isinstance(o, dict) else o
                    for kind in ("outs", "metrics", "plots") for o in definition.get(kind, [])]
        assert sorted(o["path"] for o in entry["outs"]) == sorted(declared), stage
        for key in definition.get("params", []):
            value = params
            for part in key.split("."):
                value = value[part]
            assert entry["params"]["params.yaml"][key] == value, (stage, key)
        for dep in entry["deps"]:
            if dep["path"].startswith("pipeline/"):
                current = hashlib.md5((PROJECT / dep["path"]).read_bytes()).hexdigest()
                assert dep["md5"] == current, (f"dvc.lock ran another {dep['path']}: run `dvc repro` and commit "
                                               "dvc.lock, inputs/ and metrics/")


TEACHER_COMMIT = "c5ee24cb16019beea0893ab7796b1df96625c6b8"  # a revision pins only as a full commit id


def test_inputs_link_the_local_folders_and_name_the_rest(tmp_path, monkeypatch, shared):
    from pipeline.stages import inputs

    monkeypatch.chdir(tmp_path)
    (tmp_path / "rows.jsonl").write_text("{}\n")
    params = Params.model_validate({
        "snapshot": {"train": {"source": "rows.jsonl"}, "eval": {"source": str(shared / "data/beir/scifact")}},
        "teacher": {"kind": "cross-encoder", "model": "cross-encoder/ms-marco-MiniLM-L6-v2", "revision": TEACHER_COMMIT},
        "train": {"base_model": os.path.relpath(shared / "models/splade-tiny")}})
    written = inputs.run(params)
    assert os.readlink(INPUTS_DIR / "train_data") == "../rows.jsonl"  # relative: the same in every clone
    assert os.readlink(INPUTS_DIR / "eval_data") == str(shared / "data/beir/scifact")
    assert (INPUTS_DIR / "base_model" / "config.json").read_bytes() == (shared / "models/splade-tiny/config.json").read_bytes()
    assert (INPUTS_DIR / "teacher_model").read_text() == f"hub: cross-encoder/ms-marco-MiniLM-L6-v2 @ {TEACHER_COMMIT}\n"
    assert (INPUTS_DIR / "train_corpus").read_text() == "none\n"
    assert written["base_model"].startswith("link to ")
    inputs.run(params)  # again: the links are replaced, their targets untouched
    assert (shared / "models/splade-tiny/config.json").exists()


def dvc(project: Path, *args: str) -> str:
    done = subprocess.run([str(BIN / "dvc"), *args], cwd=project, capture_output=True, text=True,
                          env=ENV)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    return done.stdout


def test_each_stage_depends_on_the_links_of_what_it_reads():
    """The slots pipeline/stages/inputs.py writes, and the stage that reads what each names."""
    from pipeline.stages import inputs

    readers = {"train_data": "snapshot", "train_corpus": "snapshot", "train_queries": "snapshot",
               "eval_data": "snapshot", "teacher_model": "teacher", "base_model": "train"}
    assert set(inputs.slots(Params())) == set(readers)
    for slot, stage in readers.items():
        assert [s for s in STAGES if f"inputs/{slot}" in STAGES[s]["deps"]] == [stage], slot


def test_an_edit_inside_a_local_file_or_folder_reruns_the_stage_that_reads_it(tmp_path, shared, cut_beir):
    """Local training rows and a local evaluation folder, named in params.yaml: after `dvc repro
    snapshot`, an edit inside the folder makes the snapshot out of date through its link (a model
    folder is linked the same way), and so does an edit of the rows file."""
    import shutil

    import pandas as pd

    project = make_project_copy(tmp_path / "project")
    rows = pd.read_csv(shared / "data/msmarco-toy-triplets/triplets.tsv", sep="\t", header=None,
                       names=["query", "positive", "negative"], dtype=str, quoting=3)
    rows.to_json(tmp_path / "rows.jsonl", orient="records", lines=True)
    shutil.copytree(cut_beir("scifact", queries=5, extra_docs=20), tmp_path / "scifact")
    params = yaml.safe_load((project / "params.yaml").read_text())
    params["snapshot"]["train"]["source"] = "../rows.jsonl"
    params["teacher"].update(USER_DATA_TEACHER)
    params["snapshot"]["eval"]["source"] = "../scifact"
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    dvc(project, "repro", "snapshot")
    assert os.readlink(project / "inputs/eval_data") == "../../scifact"
    assert json.loads(dvc(project, "status", "snapshot", "--with-deps", "--json")) == {}

    with (tmp_path / "scifact" / "queries.jsonl").open("a") as handle:
        handle.write(json.dumps({"_id": "new", "text": "a new query"}) + "\n")  # inside the folder
    assert json.loads(dvc(project, "status", "snapshot", "--with-deps", "--json")) == {
        "snapshot": [{"changed deps": {"inputs/eval_data": "modified"}}]}
    with (tmp_path / "rows.jsonl").open("a") as handle:
        handle.write(json.dumps({"query": "q", "positive": "p", "negative": "n"}) + "\n")
    assert json.loads(dvc(project, "status", "snapshot", "--with-deps", "--json")) == {
        # inputs/ holds the links: DVC hashes a file (not a folder) through its link there too
        "inputs": [{"changed outs": {"inputs": "modified"}}],
        "snapshot": [{"changed deps": {"inputs/eval_data": "modified", "inputs/train_data": "modified"}}]}
