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


# Each combination a later stage would refuse, as a user would write it: the keys its error must name
COMMIT = "0123456789abcdef0123456789abcdef01234567"
CLASHES = {
    "model teacher without a model": (
        "teacher:\n  kind: cross-encoder\n", ["teacher.kind", "teacher.model"]),
    "lexicon teacher on a user's file": (
        "snapshot:\n  train:\n    source: triples.tsv\n", ["teacher.kind", "snapshot.train.source"]),
    "distillation on pairs nobody scores": (
        "snapshot:\n  train:\n    kind: pairs\n", ["train.loss", "snapshot.train.kind"]),
    "kl-div on pairs nobody scores": (
        "snapshot:\n  train:\n    kind: pairs\ntrain:\n  loss: kl-div\n", ["train.loss", "snapshot.train.kind"]),
    "mining without pairs": (
        "teacher:\n  kind: bi-encoder\n  model: m\n  hard_negatives: 2\n",
        ["teacher.hard_negatives", "snapshot.train.kind"]),
    "mining without a bi-encoder": (
        "snapshot:\n  train:\n    kind: pairs\nteacher:\n  hard_negatives: 2\n",
        ["hard_negatives", "kind: bi-encoder"]),
    "misspelt gate metric": ("push:\n  gate:\n    metric: dot_ndgc@10\n", ["push.gate.metric", "dot_ndgc@10"]),
    "gate on a metric that is no ranking": (
        "push:\n  gate:\n    metric: query_active_dims\n", ["push.gate.metric", "dot_ndcg@10"]),
    "csr without a dense model": ("train:\n  architecture: csr\n", ["architecture csr", "base_model"]),
    "csr cut wider than its k": (f"train:\n  architecture: csr\n  base_model: m\n  revision: {COMMIT}\n  csr:\n    k: 16\n",
                                 ["max_active_dims 32", "csr.k 16"]),
    "unpinned hub teacher": (
        "snapshot:\n  train:\n    source: triples.tsv\nteacher:\n  kind: cross-encoder\n"
        "  model: cross-encoder/ms-marco-MiniLM-L6-v2\n", ["teacher.model", "teacher.revision"]),
    "unpinned hub base model": ("train:\n  base_model: naver/splade-v3\n", ["train.base_model", "train.revision"]),
    # a revision pins only as a full commit id: a branch, a tag or a short id fails, naming the key
    "a branch for a revision": ("train:\n  base_model: naver/splade-v3\n  revision: main\n",
                                ["train.revision", "'main' is not a commit id"]),
    "a short id for a revision": ("teacher:\n  revision: e0cef0a\n", ["teacher.revision", "40-hex"]),
    "a tag for a dataset revision": ("snapshot:\n  eval:\n    revision: v1.0\n", ["snapshot.eval.revision", "'v1.0'"]),
    "an upper-case commit id": (f"snapshot:\n  train:\n    revision: {COMMIT.upper()}\n",
                                ["snapshot.train.revision", "not a commit id"]),
    "significance on a metric without per-query values": (
        "push:\n  gate:\n    metric: dot_precision@3\n", ["push.gate", "significance", "rule threshold"]),
    "impossible synthetic world": ("snapshot:\n  synthetic:\n    topics: 1\n", ["topics"]),
}


@pytest.mark.parametrize("clash", list(CLASHES))
def test_params_that_a_later_stage_would_refuse_fail_at_load(tmp_path, clash):
    text, keys = CLASHES[clash]
    path = tmp_path / "params.yaml"
    path.write_text(text)
    with pytest.raises(ParamsError) as err:
        load_params(path)
    assert str(path) in str(err.value)
    for key in keys:
        assert key in str(err.value), (clash, str(err.value))


def test_the_same_keys_in_combinations_that_work_load(tmp_path, shared):
    """The checks refuse the clash, not the keys: each of these reads cleanly."""
    fine = [
        # pairs train contrastively: an unset or unpinned teacher is never used
        "snapshot:\n  train:\n    kind: pairs\n    source: pairs.jsonl\nteacher:\n  kind: cross-encoder\n"
        "  model: cross-encoder/ms-marco-MiniLM-L6-v2\ntrain:\n  loss: mnrl\n",
        # a scored snapshot carries its own scores: no teacher scores it
        "snapshot:\n  train:\n    kind: scored\n    source: scored.jsonl\n",
        # mined pairs have scores to distil
        f"snapshot:\n  train:\n    kind: pairs\n    source: pairs.jsonl\nteacher:\n  kind: bi-encoder\n"
        f"  model: {shared / 'models/all-MiniLM-L6-v2'}\n  hard_negatives: 2\ntrain:\n  loss: kl-div\n",
        # a local folder needs no revision; a Hub id with one is pinned
        f"train:\n  base_model: {shared / 'models/splade-tiny'}\n",
        f"train:\n  base_model: naver/splade-v3\n  revision: {COMMIT}\n",
        "push:\n  gate:\n    metric: dot_precision@3\n    rule: threshold\n",
        "push:\n  gate:\n    metric: dot_graded_ndcg@10\n",
    ]
    for text in fine:
        path = tmp_path / "params.yaml"
        path.write_text(text)
        load_params(path)


def test_gate_metrics_are_the_ones_evaluation_reports():
    """GATE_METRICS is what pipeline.evaluation.measures names (the stock IR evaluator's default cut-offs)."""
    from pipeline.config import GATE_METRICS
    from pipeline.data.sources import RetrievalSet
    from pipeline.evaluation.measures import scored_ranking

    data = RetrievalSet({"d1": "a b", "d2": "c d"}, {"q1": "a"}, {"q1": {"d1": 1}})
    reported, _, _ = scored_ranking(data, {"q1": {"d1": 2.0, "d2": 1.0}})
    assert set(GATE_METRICS) == set(reported)
