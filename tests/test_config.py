from pathlib import Path

import pytest

from pipeline.config import Params, ParamsError, load_params

PROJECT = Path(__file__).resolve().parents[1]


def test_shipped_params_are_the_quickstart_profile():
    params = load_params(PROJECT / "params.yaml")
    assert params.snapshot.train.source == "synthetic"
    assert params.teacher.kind == "lexicon-bm25"
    assert params.push.dry_run is True
    # params.yaml spells out every default, so reading it gives the schema's defaults
    assert params == Params()


def test_unknown_key_is_named(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  learning_rat: 0.1\n")
    with pytest.raises(ParamsError) as err:
        load_params(bad)
    assert "train.learning_rat" in str(err.value)
    assert str(bad) in str(err.value)


def test_bad_value_is_named_with_what_was_given(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("train:\n  batch_size: -4\nteacher:\n  kind: oracle\n")
    with pytest.raises(ParamsError) as err:
        load_params(bad)
    message = str(err.value)
    assert "train.batch_size" in message and "-4" in message
    assert "teacher.kind" in message and "oracle" in message


def test_missing_file_and_broken_yaml(tmp_path):
    with pytest.raises(ParamsError, match="not found"):
        load_params(tmp_path / "nope.yaml")
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [unclosed\n")
    with pytest.raises(ParamsError, match="not valid YAML"):
        load_params(broken)


def test_unknown_validation_check_is_refused(tmp_path):
    bad = tmp_path / "params.yaml"
    bad.write_text("validate:\n  severity:\n    mojibak: warning\n")
    with pytest.raises(ParamsError, match="unknown check"):
        load_params(bad)
    good = tmp_path / "good.yaml"
    good.write_text("validate:\n  severity:\n    mojibake: error\n    duplicates: off\n")
    severity = load_params(good).validate_.severity
    assert severity["mojibake"] == "error" and severity["duplicates"] == "off"
    assert severity["not_null"] == "error"
