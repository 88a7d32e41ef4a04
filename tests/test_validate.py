import json

import pandas as pd
import pytest

from pipeline import snapshot, validate
from pipeline.cli import StageError
from pipeline.config import VALIDATION_REPORT


def test_quickstart_snapshot_passes(workdir, tiny_params):
    snapshot.run(tiny_params)
    report = validate.run(tiny_params)
    assert report["success"] and report["failures"] == []
    assert report["rows_checked"] == tiny_params.snapshot.synthetic.topics * 6 * 2


def test_bad_rows_and_leaks_stop_the_run_with_a_clear_report(workdir, tiny_params):
    snapshot.run(tiny_params)
    train_path = snapshot.SNAPSHOT_DIR / snapshot.TRAIN_FILE
    frame = pd.read_parquet(train_path)
    frame.loc[3, "query"] = "   "  # empty after stripping
    frame.loc[5, "positive"] = None
    leaked = json.loads((snapshot.SNAPSHOT_DIR / "eval/queries.jsonl").read_text().splitlines()[0])["text"]
    frame.loc[7, "query"] = leaked  # an evaluation query used for training
    frame.to_parquet(train_path, index=False)

    with pytest.raises(StageError) as err:
        validate.run(tiny_params)
    message = str(err.value)
    assert "3 validation check(s) failed" in message
    assert f"{train_path}: expect_column_values_to_match_regex" in message
    assert "expect_column_values_to_not_be_null" in message and "row 5" in message
    assert "eval_queries_not_in_training" in message and leaked in message
    report = json.loads(VALIDATION_REPORT.read_text())
    assert report["success"] is False
    failing = {f["expectation"]: f for f in report["failures"]}
    assert failing["expect_column_values_to_match_regex"]["failing_count"] == 1
    assert list(failing["expect_column_values_to_match_regex"]["example_rows"]) == ["3"]
