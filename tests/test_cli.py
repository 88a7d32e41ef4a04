import contextlib
import io
import runpy
import subprocess
import sys

import pytest

from tests.helpers.project import PROJECT

STAGES = ["inputs", "snapshot", "validate", "teacher", "train", "export", "evaluate", "card", "push", "track"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_a_help(stage, monkeypatch):
    """`python -m pipeline.stages.<stage> --help`, run as python runs it (the module as __main__), in this
    process: the libraries are imported once for all stages."""
    monkeypatch.setattr(sys, "argv", [f"pipeline/stages/{stage}.py", "--help"])
    out = io.StringIO()
    with contextlib.redirect_stdout(out), pytest.raises(SystemExit) as done:
        runpy.run_module(f"pipeline.stages.{stage}", run_name="__main__", alter_sys=True)
    assert done.value.code == 0
    assert "--params" in out.getvalue()


def test_bad_params_fail_with_the_key_and_no_traceback(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    done = subprocess.run([sys.executable, "-m", "pipeline.stages.snapshot", "--params", str(bad)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "train.epochz" in done.stderr and "Traceback" not in done.stderr


def test_dvc_yaml_names_every_stage_module():
    import yaml

    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == STAGES
    assert all(stages[name]["cmd"] == f"python -m pipeline.stages.{name}" for name in STAGES)
