"""Bad data stops the run before the teacher, with a message naming file, check and example row."""

import json
import math

import pandas as pd
import pytest

from pipeline.cli import StageError
from pipeline.config import (
    RECORDS_DIR,
    SNAPSHOT_DIR,
    TEACHER_DIR,
    VALIDATION_REPORT,
    Params,
    ValidateConfig,
)
from pipeline.stages import snapshot, validate
from tests.helpers.project import USER_DATA_TEACHER

GOOD = [{"query": f"query number {i}", "positive": f"relevant passage {i} text",
         "negative": f"other passage {i} text"} for i in range(12)]


def params_for(tiny_params, source=None, eval_source=None, **train) -> Params:
    data = tiny_params.model_dump(by_alias=True)
    data["validate"]["min_rows"] = 1
    if source is not None:
        data["snapshot"]["train"].update(source=str(source), **train)
        data["teacher"].update(USER_DATA_TEACHER)
        if train.get("kind") == "pairs":  # pairs train contrastively
            data["train"]["loss"] = "mnrl"
    if eval_source is not None:
        data["snapshot"]["eval"].update(source=str(eval_source))
    return Params.model_validate(data)


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def snapshot_then_validate(params):
    snapshot.run(params)
    return validate.run(params)


def test_quickstart_snapshot_passes(workdir, tiny_params):
    result = snapshot_then_validate(tiny_params)
    assert result["success"] and result["errors"] == 0 and result["warnings"] == 0
    assert result["rows_checked"] == tiny_params.snapshot.synthetic.topics * 6 * 2


def test_msmarco_mojibake_is_a_warning_with_its_count(workdir, tiny_params, shared):
    params = params_for(tiny_params, shared / "data/msmarco-toy-triplets/triplets.tsv",
                        columns=["query", "positive", "negative"])
    result = snapshot_then_validate(params)
    assert result["success"] and result["errors"] == 0
    mojibake = {f["kwargs"]["column"]: f["failing_count"] for f in result["findings"] if f["check"] == "mojibake"}
    assert mojibake["positive"] > 0 and sum(mojibake.values()) >= 20
    assert all(f["severity"] == "warning" for f in result["findings"])
    # what MLflow gets: the check's rows over every column, not the last column's
    record = json.loads((RECORDS_DIR / "validate.json").read_text())
    assert len(mojibake) > 1 and record["metrics"]["mojibake_rows"] == sum(mojibake.values())
    print(f"\nmojibake rows per column in the MS MARCO toy triplets: {mojibake}")


def bad_cases(tmp):
    """(name, params kwargs, text the failure must show) for each malformed input."""
    cases = []

    def jsonl(name, rows, **kw):
        cases.append((name, {"source": write_jsonl(tmp / f"{name}.jsonl", rows), **kw}))

    jsonl("missing_column", [{"query": r["query"], "positive": r["positive"]} for r in GOOD])
    jsonl("empty_text", GOOD[:3] + [{**GOOD[3], "query": "   "}] + GOOD[4:])
    jsonl("null_text", GOOD[:3] + [{**GOOD[3], "positive": None}] + GOOD[4:])
    jsonl("duplicate_rows", GOOD + [GOOD[2]])
    jsonl("positive_is_negative", GOOD[:5] + [{**GOOD[5], "negative": GOOD[5]["positive"]}] + GOOD[6:])
    jsonl("query_is_positive", GOOD[:5] + [{**GOOD[5], "positive": GOOD[5]["query"]}] + GOOD[6:])
    jsonl("too_long", GOOD[:5] + [{**GOOD[5], "positive": "word " * 5000}] + GOOD[6:])
    for name, bad_score in (("nan_score", math.nan), ("inf_score", math.inf)):
        frame = pd.DataFrame(GOOD).assign(score=[1.0] * 6 + [bad_score] + [2.0] * 5)
        frame.to_parquet(tmp / f"{name}.parquet")
        cases.append((name, {"source": tmp / f"{name}.parquet", "kind": "scored"}))
    truncated = tmp / "truncated.jsonl"
    truncated.write_text(json.dumps(GOOD[0]) + "\n" + json.dumps(GOOD[1])[:25] + "\n")
    cases.append(("truncated_jsonl", {"source": truncated}))
    jsonl("text_is_a_list", GOOD[:3] + [{**GOOD[3], "query": ["query", "number", "3"]}] + GOOD[4:])
    jsonl("text_is_an_object", GOOD[:4] + [{**GOOD[4], "positive": {"text": "relevant"}}] + GOOD[5:])
    jsonl("text_is_a_number", GOOD[:5] + [{**GOOD[5], "negative": 12}] + GOOD[6:])
    jsonl("score_is_text", [{**r, "score": 1.5} for r in GOOD[:6]] + [{**GOOD[6], "score": "high"}]
          + [{**r, "score": 2} for r in GOOD[7:]], kind="scored")
    scored_tsv = tmp / "score_text_in_tsv.tsv"
    scored_tsv.write_text("query\tpositive\tnegative\tscore\n" + "".join(
        f"{r['query']}\t{r['positive']}\t{r['negative']}\t{'n/a' if i == 3 else 0.5 * i}\n" for i, r in enumerate(GOOD)))
    cases.append(("score_text_in_tsv", {"source": scored_tsv, "kind": "scored"}))
    latin1 = tmp / "latin1.tsv"
    latin1.write_bytes("query\tpositive\tnegative\n".encode() + "caf\xe9 au lait\tcoffee\ttea\n".encode("latin-1"))
    cases.append(("non_utf8", {"source": latin1}))
    jsonl("score_list_too_short", [{**r, "score": [2.0, 1.0]} for r in GOOD[:4]] + [{**GOOD[4], "score": [2.0]}]
          + [{**r, "score": [3.0, 0.5]} for r in GOOD[5:]], kind="scored")
    jsonl("score_lists_mixed_with_margins", [{**r, "score": [2.0, 1.0]} for r in GOOD[:8]] + [{**GOOD[8], "score": 1.0}]
          + [{**r, "score": [3.0, 0.5]} for r in GOOD[9:]], kind="scored")
    not_utf8 = tmp / "parquet_text_not_utf8.parquet"  # bytes changed inside a stored string
    pd.DataFrame(GOOD).assign(query=[f"caf\u00e9 {i}" for i in range(12)]).to_parquet(not_utf8, compression=None)
    not_utf8.write_bytes(not_utf8.read_bytes().replace("caf\u00e9 7".encode(), b"caf\xff\xfe 7"))
    cases.append(("parquet_text_not_utf8", {"source": not_utf8}))
    lone = tmp / "lone_surrogate.jsonl"  # JSON may escape half a surrogate pair; no text holds one
    lone.write_text("".join(json.dumps({**r, "query": r["query"] + "\udc07" * (i == 3)}) + "\n" for i, r in enumerate(GOOD)))
    cases.append(("lone_surrogate", {"source": lone}))
    headerless = tmp / "headerless_wrong_width.tsv"
    headerless.write_text("".join(f"{r['query']}\t{r['positive']}\n" for r in GOOD))
    cases.append(("headerless_wrong_width", {"source": headerless}))
    return cases


EXPECTED = {  # the check each malformed input must fail, and text from the offending row
    "missing_column": ("required_columns", "query number 0"),
    "empty_text": ("expect_column_values_to_match_regex", "row 3"),
    "null_text": ("expect_column_values_to_not_be_null", "row 3"),
    "duplicate_rows": ("expect_column_values_to_be_unique", "query number 2"),
    "positive_is_negative": ("check_positive_equals_a_negative", "relevant passage 5 text"),
    "query_is_positive": ("check_query_equals_positive", "query number 5"),
    "too_long": ("expect_column_value_lengths_to_be_between", "row 5"),
    "nan_score": ("expect_column_values_to_not_be_null", "row 6"),
    "inf_score": ("check_score_is_finite", "row 6"),
    "truncated_jsonl": ("valid_jsonl", "line 2"),
    "non_utf8": ("utf8_encoding", "caf"),
    "lone_surrogate": ("utf8_encoding", "line 4 escapes half of a UTF-16 surrogate pair"),
    "headerless_wrong_width": ("header_row", "its 2 fields are not the 3 of kind 'triplets'"),
    "text_is_a_list": ("text_fields", "line 4: query is a list"),
    "text_is_an_object": ("text_fields", "line 5: positive is an object"),
    "text_is_a_number": ("text_fields", "line 6: negative is a number"),
    "score_is_text": ("score_fields", "line 7: score 'high' is not a number"),
    "score_text_in_tsv": ("score_fields", "line 5: score 'n/a' is not a number"),
    "parquet_text_not_utf8": ("valid_parquet", "not a readable parquet file"),
    "score_list_too_short": ("score_fields", "line 5: a score list holds one score per document"),
    "score_lists_mixed_with_margins": ("score_fields", "line 9: score 1.0 mixes"),
}


@pytest.mark.parametrize("case", list(EXPECTED))
def test_each_bad_training_input_stops_before_the_teacher(case, workdir, tiny_params):
    snapshot.run(tiny_params)  # a good earlier snapshot, which a bad source must leave as it is
    before = {p: p.read_bytes() for p in SNAPSHOT_DIR.rglob("*") if p.is_file()}
    kwargs = dict(bad_cases(workdir))[case]
    params = params_for(tiny_params, **kwargs)
    with pytest.raises(StageError) as err:
        snapshot_then_validate(params)
    message = str(err.value)
    expectation, example = EXPECTED[case]
    assert kwargs["source"].name in message
    assert expectation in message and example in message, message
    assert not TEACHER_DIR.exists()
    if not VALIDATION_REPORT.exists():  # failed while reading: the old snapshot is untouched
        assert before == {p: p.read_bytes() for p in SNAPSHOT_DIR.rglob("*") if p.is_file()}


def write_beir(folder, corpus, queries, qrels):
    (folder / "qrels").mkdir(parents=True)
    (folder / "corpus.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in corpus.items()))
    (folder / "queries.jsonl").write_text("".join(json.dumps({"_id": k, "text": v}) + "\n" for k, v in queries.items()))
    if qrels is not None:
        (folder / "qrels" / "test.tsv").write_text(
            "query-id\tcorpus-id\tscore\n" + "".join(f"{q}\t{d}\t1\n" for q, d in qrels))


@pytest.mark.parametrize("case", ["qrels_missing_doc", "beir_without_qrels", "leak"])
def test_bad_evaluation_sets_stop_before_the_teacher(case, workdir, tiny_params):
    train = write_jsonl(workdir / "train.jsonl", GOOD)
    folder = workdir / case
    corpus = {"d1": "relevant passage 1 text", "d2": "another passage"}
    queries = {"e1": "a held out question", "e2": GOOD[4]["query"] if case == "leak" else "second question"}
    qrels = {"qrels_missing_doc": [("e1", "d1"), ("e2", "d404")], "beir_without_qrels": None,
             "leak": [("e1", "d1"), ("e2", "d2")]}[case]
    write_beir(folder, corpus, queries, qrels)
    with pytest.raises(StageError) as err:
        snapshot_then_validate(params_for(tiny_params, train, eval_source=folder))
    message = str(err.value)
    expectation, example = {"qrels_missing_doc": ("qrels_reference_existing_docs", "d404"),
                            "beir_without_qrels": ("beir_layout", "qrels/test.tsv is missing"),
                            "leak": ("eval_queries_not_in_training", GOOD[4]["query"])}[case]
    assert str(folder) in message and expectation in message and example in message, message
    assert not TEACHER_DIR.exists()


def test_duplicate_texts_under_distinct_ids_are_a_warning_naming_the_count(workdir, tiny_params, capsys):
    """Real corpora hold one text under several ids: a warning with its count and the ids (the stage
    and the standalone checker), the run going on; `error` severity refuses it. A repeated *id* stays
    an error (BAD_SETS)."""
    train = write_jsonl(workdir / "train.jsonl", GOOD)
    folder = workdir / "duplicates"
    corpus = {"d1": "relevant passage 1 text", "d2": "another passage", "d3": "relevant passage 1 text",
              "d4": "another passage", "d5": "relevant passage 1 text", "d6": "a passage of its own"}
    write_beir(folder, corpus, {"e1": "a held out question"}, [("e1", "d1")])
    params = params_for(tiny_params, train, eval_source=folder)
    result = snapshot_then_validate(params)
    assert result["success"] and result["warnings"] == 1
    finding, = result["findings"]
    assert (finding["check"], finding["severity"], finding["failing_count"]) == ("corpus_duplicate_texts", "warning", 3)
    assert [(e["corpus-id"], e["same_text_as"]) for e in finding["example_rows"].values()] == [
        ("d3", "d1"), ("d4", "d2"), ("d5", "d1")]

    with pytest.raises(SystemExit) as exit_:
        validate.main([str(folder), "--kind", "beir", "--params", str(workdir / "none.yaml")])
    assert exit_.value.code == 0
    out, err = capsys.readouterr()
    assert json.loads(out.splitlines()[-1])["warnings"] == 1
    assert "[warning]" in err and "corpus_texts_unique" in err and "failed for 3 row(s)" in err and '"d5"' in err

    data = params.model_dump(by_alias=True)
    data["validate"]["severity"] = {"corpus_duplicate_texts": "error"}
    with pytest.raises(StageError, match=r"corpus_texts_unique .*failed for 3 row"):
        validate.run(Params.model_validate(data))


def jsonl_lines(path, rows):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


BAD_SETS = {  # corpus rows, query rows, qrels lines; the check and the text the message must show
    "repeated_doc_id": ([{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"}, {"_id": "d1", "text": "c"}],
                        None, None, ("unique_ids", "line 3: id 'd1' is used again (first at line 1")),
    "repeated_query_id": (None, [{"_id": "e1", "text": "q"}, {"_id": "e1", "text": "q2"}], None,
                          ("unique_ids", "line 2: id 'e1' is used again")),
    "repeated_numeric_doc_id": ([{"_id": 7, "text": "a"}, {"_id": "7", "text": "b"}], None, None,
                                ("unique_ids", "line 2: id '7'")),
    "doc_text_is_a_list": ([{"_id": "d1", "text": "a"}, {"_id": "d2", "text": ["b", "c"]}], None, None,
                           ("id_text_fields", "line 2: text is a list, not text")),
    "doc_title_is_a_number": ([{"_id": "d1", "title": 3, "text": "a"}, {"_id": "d2", "title": "", "text": "b"}],
                              None, None, ("id_text_fields", "line 1: title is a number")),
    "doc_without_id": ([{"_id": "d1", "text": "a"}, {"text": "b"}], None, None,
                       ("id_text_fields", "line 2: _id is missing")),
    "query_id_is_an_object": (None, [{"_id": {"id": 1}, "text": "q"}], None,
                              ("id_text_fields", "line 1: _id is an object")),
    "grade_is_text": (None, None, "query-id\tcorpus-id\tscore\ne1\td1\t1\ne2\td2\thigh\n",
                      ("qrels_scores", "row 3: score 'high' is not a number")),
}


@pytest.mark.parametrize("case", list(BAD_SETS))
def test_bad_evaluation_files_name_file_line_and_id(case, workdir, tiny_params):
    train = write_jsonl(workdir / "train.jsonl", GOOD)
    folder = workdir / case
    corpus, queries, qrels, (check, text) = BAD_SETS[case]
    jsonl_lines(folder / "corpus.jsonl", corpus or [{"_id": "d1", "text": "a"}, {"_id": "d2", "text": "b"}])
    jsonl_lines(folder / "queries.jsonl", queries or [{"_id": "e1", "text": "q one"}, {"_id": "e2", "text": "q two"}])
    (folder / "qrels/test.tsv").parent.mkdir()
    (folder / "qrels/test.tsv").write_text(qrels or "query-id\tcorpus-id\tscore\ne1\td1\t1\ne2\td2\t1\n")
    with pytest.raises(StageError) as err:
        snapshot_then_validate(params_for(tiny_params, train, eval_source=folder))
    message = str(err.value)
    assert str(folder) in message and check in message and text in message, message
    assert "Traceback" not in message and not TEACHER_DIR.exists()


def test_ms_marco_triples_read_without_columns_as_header_less_with_a_notice(workdir, tiny_params, shared, caplog):
    triples = shared / "data/msmarco-toy-triplets/triplets.tsv"
    result = snapshot_then_validate(params_for(tiny_params, triples))
    assert result["success"] and result["rows_checked"] == 100
    assert "line 1 is not a header row" in caplog.text and "query, positive, negative" in caplog.text
    first = triples.read_text(encoding="utf-8").split("\n")[0].split("\t")
    assert pd.read_parquet(SNAPSHOT_DIR / "train.parquet").iloc[0].tolist()[:3] == first


def test_numeric_ids_numeric_text_scores_and_score_lists_are_valid(workdir, tiny_params):
    """What the integrity checks must not refuse: ids written as JSON numbers, scores as numeric
    text (every tsv score is text), a teacher's score lists."""
    folder = workdir / "numeric_ids"
    jsonl_lines(folder / "corpus.jsonl", [{"_id": i, "title": "t", "text": f"passage {i}"} for i in range(1, 4)])
    jsonl_lines(folder / "queries.jsonl", [{"_id": 10 + i, "text": f"a held out question {i}"} for i in range(1, 3)])
    (folder / "qrels").mkdir()
    (folder / "qrels/test.tsv").write_text("query-id\tcorpus-id\tscore\n11\t1\t1\n12\t3\t2\n")
    scored = workdir / "scored.tsv"
    scored.write_text("query\tpositive\tnegative\tscore\n" + "".join(
        f"{r['query']}\t{r['positive']}\t{r['negative']}\t{0.25 * i}\n" for i, r in enumerate(GOOD)))
    result = snapshot_then_validate(params_for(tiny_params, scored, eval_source=folder, kind="scored"))
    assert result["success"]
    frame = pd.read_parquet(SNAPSHOT_DIR / "train.parquet")
    assert frame["score"].tolist() == [0.25 * i for i in range(len(GOOD))]
    lists = write_jsonl(workdir / "lists.jsonl", [{**r, "scores": [2.0, "-1.5"]} for r in GOOD])
    snapshot.run(params_for(tiny_params, lists, kind="scored"))
    assert pd.read_parquet(SNAPSHOT_DIR / "train.parquet")["score"].map(list).tolist() == [[2.0, -1.5]] * len(GOOD)


def test_report_and_severity_from_params(workdir, tiny_params):
    source = write_jsonl(workdir / "dupes.jsonl", GOOD + [GOOD[0]])
    params = params_for(tiny_params, source)
    with pytest.raises(StageError):
        snapshot_then_validate(params)
    report = json.loads(VALIDATION_REPORT.read_text())
    assert report["success"] is False and report["errors"] == 1
    (finding,) = report["findings"]
    assert finding["failing_count"] == 2 and finding["file"] == str(source)
    data = params.model_dump(by_alias=True)
    data["validate"]["severity"] = {"duplicates": "warning"}
    assert validate.run(Params.model_validate(data))["warnings"] == 1  # a warning lets the run go on


def test_standalone_contract_exit_codes(workdir, shared, capsys):
    good = write_jsonl(workdir / "good.jsonl", GOOD)
    bad = write_jsonl(workdir / "bad.jsonl", GOOD[:2] + [{**GOOD[2], "query": ""}])
    for argv, code in [([str(good), "--kind", "triplets"], 0),
                       ([str(bad), "--kind", "triplets"], 1),
                       ([str(good), "--kind", "pairs"], 0),
                       ([str(shared / "data/beir/scifact"), "--kind", "beir"], 0),
                       ([str(workdir / "missing.jsonl"), "--kind", "triplets"], 1)]:
        with pytest.raises(SystemExit) as exit_:
            validate.main(argv + ["--params", str(workdir / "none.yaml")])
        assert exit_.value.code == code, argv
    with pytest.raises(SystemExit):
        validate.main([str(bad), "--kind", "triplets"])
    err = capsys.readouterr().err
    assert "bad.jsonl" in err and "expect_column_values_to_match_regex" in err and "row 2" in err


def test_standalone_check_of_id_based_rows_joins_them_to_their_texts(workdir, capsys):
    """Id-based rows get the verdicts, counts and example rows their texts get (a query with no
    text, a positive that is also the negative), from the standalone check as from text rows."""
    rows = [dict(row) for row in GOOD]
    rows[2]["query"], rows[5]["negative"] = " ", rows[5]["positive"]
    texts = {"query": {}, "document": {}}
    ids = []
    for row in rows:
        named = {}
        for column, text in row.items():
            lookup = texts["query" if column == "query" else "document"]
            named[f"{column}_id"] = lookup.setdefault(text, f"{column[0]}{len(lookup)}")
        ids.append(named)
    for name, lookup in texts.items():
        write_jsonl(workdir / f"{name}.jsonl", [{"_id": i, "text": t} for t, i in lookup.items()])
    write_jsonl(workdir / "ids.jsonl", ids)
    write_jsonl(workdir / "texts.jsonl", rows)
    cfg = ValidateConfig(min_rows=1)
    by_text = validate.validate_source(str(workdir / "texts.jsonl"), "triplets", cfg, "train", None)
    by_id = validate.validate_source(str(workdir / "ids.jsonl"), "triplets", cfg, "train", None,
                                     str(workdir / "document.jsonl"), str(workdir / "query.jsonl"))
    assert {f["check"] for f in by_id["findings"]} == {"not_empty", "positive_is_negative"}
    for report in (by_text, by_id):
        for finding in report["findings"]:
            assert finding.pop("file").endswith(("texts.jsonl", "ids.jsonl"))
    assert by_id == by_text
    with pytest.raises(SystemExit) as exit_:  # as the command line runs it
        validate.main([str(workdir / "ids.jsonl"), "--kind", "triplets", "--corpus", str(workdir / "document.jsonl"),
                       "--queries", str(workdir / "query.jsonl"), "--params", str(workdir / "none.yaml")])
    assert exit_.value.code == 1
    assert "ids.jsonl" in capsys.readouterr().err


def test_repeated_texts_are_found_through_hashes_and_confirmed_on_the_texts(monkeypatch, tmp_path):
    """A repeated text is reported with the first id that has it, in corpus order, from the
    snapshot's lazily read corpus as from a dict; texts whose hashes collide are compared, not
    taken for repeats (every hash made equal here)."""
    import numpy as np
    import pandas as pd

    from pipeline.data.snapshots import read_eval_set, write_eval_set
    from pipeline.data.sources import RetrievalSet
    from pipeline.stages.validate import repeated_texts

    corpus = {"d0": "a", "d1": "b", "d2": "a", "d3": "c", "d4": "b", "d5": "a"}
    expected = [("d2", "d0"), ("d4", "d1"), ("d5", "d0")]
    write_eval_set(RetrievalSet(corpus, {"q": "a"}, {"q": {"d0": 1}}), tmp_path / "set")
    for texts in (corpus, read_eval_set(tmp_path / "set").corpus):
        assert [(e["corpus-id"], e["same_text_as"]) for e in repeated_texts(texts)] == expected
    monkeypatch.setattr(pd.util, "hash_array", lambda values: np.zeros(len(values), dtype=np.uint64))
    assert [(e["corpus-id"], e["same_text_as"]) for e in repeated_texts(corpus)] == expected
    assert repeated_texts({"d0": "a", "d1": "b"}) == []
