"""The retraining workflow: valid for GitHub Actions, and made of the README's commands."""

import re
import subprocess
import sys
from pathlib import Path

import yaml

from tests.helpers.project import PROJECT

WORKFLOW = PROJECT / ".github/workflows/retrain.yml"


def readme_commands() -> list[str]:
    """The commands in the README's bash blocks, comments dropped."""
    blocks = re.findall(r"```bash\n(.*?)```", (PROJECT / "README.md").read_text(), re.S)
    return [line.split("#")[0].strip() for block in blocks for line in block.splitlines() if line.split("#")[0].strip()]


def check(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / "check-jsonschema"), "--builtin-schema",
                           "vendor.github-workflows", str(path)], capture_output=True, text=True)


def test_the_workflow_passes_the_github_workflow_schema(tmp_path):
    done = check(WORKFLOW)
    assert done.returncode == 0, done.stdout + done.stderr
    broken = tmp_path / "broken.yml"  # and the check can fail
    broken.write_text(WORKFLOW.read_text().replace("runs-on:", "runs_on:"))
    assert check(broken).returncode != 0


def test_the_workflow_triggers_and_steps_are_the_readmes():
    workflow = yaml.safe_load(WORKFLOW.read_text())
    triggers = workflow[True]  # YAML 1.1 reads the key `on` as True
    assert {"params.yaml", "dvc.lock", "**/*.dvc"} <= set(triggers["push"]["paths"])
    assert triggers["schedule"][0]["cron"] and "workflow_dispatch" in triggers
    runs = [step["run"] for step in workflow["jobs"]["retrain"]["steps"] if "run" in step]
    install, main_job = readme_commands()[0], "dvc repro"
    assert install.startswith("python3.11 -m venv") and any(install in run for run in runs)
    assert any(f"&& {main_job}" in run for run in runs) and main_job in readme_commands()
    summary = next(run for run in runs if "GITHUB_STEP_SUMMARY" in run)
    assert "dvc params diff" in summary and "dvc metrics diff" in summary


def test_hf_token_is_given_to_the_hub_push_step_only():
    """Not to the job (every step, `pip install` of some 300 packages included), only where the
    push stage runs."""
    workflow = yaml.safe_load(WORKFLOW.read_text())
    job = workflow["jobs"]["retrain"]
    assert "HF_TOKEN" not in str(workflow.get("env", {})) and "HF_TOKEN" not in str(job.get("env", {}))
    holders = [step for step in job["steps"] if "HF_TOKEN" in str(step.get("env", {}))]
    assert [step["run"].split("&&")[-1].strip() for step in holders] == ["dvc repro push"]
    assert [step for step in job["steps"] if "HF_TOKEN" in str(step)] == holders  # no step's command reads it
