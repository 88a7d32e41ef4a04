"""The Prefect flow's pieces that need no pipeline run: which failures it retries, and how its
overrides set params (the flow end to end is in test_quickstart)."""

import pytest
import yaml
from prefect.states import Completed, Failed

from flows.retrain import StageFailed, apply_overrides, retry_if_transient, run_stage
from tests.conftest import PROJECT


def test_transient_stage_failures_are_retried_and_others_are_not():
    locked = StageFailed("train", 255, "ERROR: Unable to acquire lock. Most likely another DVC process is running")
    bad_data = StageFailed("validate", 1, "error: data/train.jsonl: not_null failed: 3 rows")
    assert retry_if_transient(None, None, Failed(data=locked))
    assert not retry_if_transient(None, None, Failed(data=bad_data))
    assert not retry_if_transient(None, None, Failed(data=ValueError("not a stage failure")))
    assert not retry_if_transient(None, None, Completed(data="ran"))
    assert run_stage.retries == 3 and run_stage.retry_condition_fn is retry_if_transient
    assert list(run_stage.retry_delay_seconds) == [10, 20, 40]  # exponential backoff
    assert "stage 'validate' failed (exit 1)" in str(bad_data)


def test_overrides_set_params_as_dvc_exp_run_does_and_are_validated_first(tmp_path):
    params_file = tmp_path / "params.yaml"
    params_file.write_text((PROJECT / "params.yaml").read_text())
    apply_overrides(["train.learning_rate=1e-4", "push.gate.minimum=0.5", "evaluate.max_active_dims=[16, 32]"],
                    params_file)
    params = yaml.safe_load(params_file.read_text())
    assert params["train"]["learning_rate"] == 1e-4 and params["push"]["gate"]["minimum"] == 0.5
    assert params["evaluate"]["max_active_dims"] == [16, 32]
    before = params_file.read_text()
    with pytest.raises(Exception, match="learning_rat"):
        apply_overrides(["train.learning_rat=1e-4"], params_file)  # an unknown key
    with pytest.raises(ValueError, match="not key=value"):
        apply_overrides(["train.learning_rate"], params_file)
    assert params_file.read_text() == before  # nothing written
