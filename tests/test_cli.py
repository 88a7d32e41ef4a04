import subprocess
import sys

import pytest

from tests.conftest import PROJECT

STAGES = ["snapshot", "validate", "teacher", "train", "evaluate", "card", "push", "track"]


@pytest.mark.parametrize("stage", STAGES)
def test_every_stage_has_a_help(stage):
    done = subprocess.run([sys.executable, "-m", f"pipeline.{stage}", "--help"], cwd=PROJECT,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--params" in done.stdout


def test_bad_params_fail_with_the_key_and_no_traceback(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  epochz: 3\n")
    done = subprocess.run([sys.executable, "-m", "pipeline.snapshot", "--params", str(bad)],
                          cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert "train.epochz" in done.stderr and "Traceback" not in done.stderr


def test_dvc_yaml_names_every_stage_module():
    import yaml

    stages = yaml.safe_load((PROJECT / "dvc.yaml").read_text())["stages"]
    assert list(stages) == STAGES
    assert all(stages[name]["cmd"] == f"python -m pipeline.{name}" for name in STAGES)
